//! Expert parallelism for pdserve: where experts live, how hot experts are replicated, and when
//! to re-plan.
//!
//! An EP group of `D` GPUs (ranks) serves `N` logical routed experts through `N + R` physical
//! slots, `R` of them redundant copies of hot experts (DeepSeek's production: `N = 256`, `R = 32`,
//! EP32 prefill with 9 slots per GPU, EP144 decode with 2). Principal types:
//!
//! - [`ExpertPlacement`] (from a [`PlacementConfig`]): the validated layout of one MoE layer:
//!   logical ↔ physical maps, the rank of each slot, nodes, where the shared expert runs, and the
//!   pure replica choice for a token ([`ExpertPlacement::select_replica`]).
//! - [`ExpertLoadStats`]: per-layer token counts per logical expert over a [`LoadWindow`];
//!   snapshots are [`ExpertLoad`], which is also the JSON load file.
//! - [`eplb`]: DeepSeek's EPLB, hierarchical and global policies, producing [`EplbPlan`]s.
//! - [`Balance`]: per-GPU load balance (balancedness = mean / max, and max / mean).
//! - [`Rebalancer`]: the pure policy that says when to re-run EPLB, with a [`RebalancerConfig`].
//! - [`EpGroup`] (from an [`EpRuntimeConfig`]): the EP runtime, `D` ranks that own their experts'
//!   weights and run the model's routed experts ([`pdserve_model::MoeExperts`]) through a
//!   dispatch/combine transport, recording [`StepTraffic`] for the fabric, load statistics for
//!   EPLB, and rebalancing between steps ([`runtime`] module).
//!
//! `docs/eplb.md` describes the algorithms, reports measured balance at EP 8/32/144, and
//! describes the EP runtime with its measured cost.
//!
//! # Example
//!
//! ```
//! use pdserve_ep::{
//!     Balance, ExpertLoad, ExpertPlacement, PlacementConfig, Rebalancer, RebalancerConfig,
//! };
//!
//! # fn main() -> Result<(), pdserve_ep::EpError> {
//! // EP32 on 4 nodes, 256 experts + 32 redundant slots: 9 physical experts per GPU.
//! let placement = PlacementConfig {
//!     num_ranks: 32,
//!     num_redundant_experts: 32,
//!     ..PlacementConfig::default()
//! };
//! let rebalancer = Rebalancer::new(placement.clone(), RebalancerConfig::default())?;
//!
//! // A skewed load: expert 7 receives 40x the tokens of any other.
//! let mut layer = vec![100.0; 256];
//! layer[7] = 4000.0;
//! let load = ExpertLoad::new(vec![layer.clone()])?;
//!
//! let before = ExpertPlacement::from_config(&placement)?;
//! let after = rebalancer.placements_for(&load)?.remove(0);
//! assert_eq!(after.experts_per_rank(), 9);
//! assert!(after.replicas(7).unwrap().len() > 1, "the hot expert is replicated");
//!
//! let b0 = Balance::of(&before.expected_rank_loads(&layer)?);
//! let b1 = Balance::of(&after.expected_rank_loads(&layer)?);
//! assert!(b1.max < b0.max && b1.balancedness() > b0.balancedness());
//!
//! // Which replica of expert 7 token 3 of rank 5 uses: a pure function.
//! let physical = after.select_replica(7, 3, 5)?;
//! assert_eq!(after.physical_to_logical()[physical], 7);
//! # Ok(())
//! # }
//! ```

mod balance;
pub mod eplb;
mod error;
mod placement;
mod rebalance;
pub mod runtime;
mod stats;
pub mod synthetic;

pub use balance::{Balance, layer_balances, mean_balancedness, mean_max_over_mean};
pub use eplb::{EplbParams, EplbPlan, EplbPolicy, rebalance_experts};
pub use error::EpError;
pub use placement::{ExpertPlacement, PlacementConfig, ReplicaPolicy, SharedExpertPlacement};
pub use rebalance::{PolicyChoice, Rebalancer, RebalancerConfig};
pub use runtime::{
    DispatchMatrix, EpBatch, EpGroup, EpRank, EpRuntimeConfig, EpRuntimeError, LayerBalance,
    LayerTraffic, RankLayer, RebalanceReport, StepTraffic, WeightMoves,
};
pub use stats::{ExpertLoad, ExpertLoadStats, LOAD_FILE_VERSION, LoadWindow};
