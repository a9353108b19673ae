//! pdserve's simulated fabric: the modeled cluster that charges simulated time for every real step.
//!
//! Real tokens come from a real (possibly tiny) model; the time a step takes is computed here for a
//! *modeled* cluster (default: DeepSeek-V3 on H800) from the real step's batch and expert routing.
//! Nothing here reads a clock or draws unseeded randomness: time and seeds are inputs, and the
//! same inputs give byte-identical timelines.
//!
//! Principal types:
//! - [`HardwareProfile`]: GPU, node, NVLink and NIC numbers (`config/hardware/*.toml`, built in by
//!   name or loaded from a user's file).
//! - [`ModelShape`]: the modeled model's `config.json` (built in: `deepseek-v3`,
//!   `deepseek-v2-lite`, `qwen2.5-72b`, `llama-3.1-405b`).
//! - [`Topology`], [`ExpertPlacement`], [`LayerRouting`], [`StepBatch`]: where GPUs are, where
//!   experts are, where tokens go, what each GPU runs.
//! - [`LinkSim`]: one link direction as a processor-sharing server with latency
//!   (`start_transfer(now, bytes)`, `advance_to(now)`).
//! - [`Fabric`]: the EP group in a [`Mode`] (`Analysis`: the paper's assumptions; `Detailed`:
//!   DeepEP's path, contention, latency, compute). [`Fabric::simulate_step`] gives a
//!   [`StepOutcome`] (duration, per-layer times, collectives, an optional [`Trace`] exportable as
//!   Chrome/Perfetto JSON); [`Fabric::simulate_collective`] one dispatch or combine;
//!   [`Fabric::kv_transfer`] a prefilled request's KV move. A step's traffic plans are built
//!   ahead on [`Fabric::plan_threads`] threads (default: the host's parallelism, at most
//!   [`MAX_DEFAULT_PLAN_THREADS`]; [`Fabric::with_plan_threads`]), bit-identically for any count.
//! - [`paper_analysis`]: the paper's closed-form table; [`SyntheticRouting`]: seeded routings;
//!   [`Scenario`]: a whole synthetic step from a TOML file (`config/sim/*.toml`).
//!
//! ```
//! use pdserve_fabric::{
//!     DispatchPath, ExpertPlacement, Fabric, FabricConfig, HardwareProfile, ModelShape, Mode,
//!     Phase, RoutingKind, Schedule, StepBatch, StepInput, SyntheticRouting,
//! };
//!
//! # fn main() -> Result<(), pdserve_fabric::FabricError> {
//! let shape = ModelShape::deepseek_v3()?;
//! let fabric = Fabric::new(FabricConfig {
//!     profile: HardwareProfile::builtin("h800")?,
//!     shape: shape.clone(),
//!     ep_size: 32,
//!     mode: Mode::Detailed,
//!     path: DispatchPath::Forwarded,
//! })?;
//! // 32 GPUs, 16 decode requests each with 4096 tokens of context.
//! let batch = StepBatch::uniform(32, 16, 4096, 1);
//! // Routing of the real model's MoE layers (here: 2 synthetic layers, reused cyclically).
//! let router = SyntheticRouting::for_shape(&shape, RoutingKind::NodeLimited)?;
//! let routing = router.generate_layers(&batch.tokens_per_rank(), 42, 2)?;
//! let placement = ExpertPlacement::contiguous(256, 32)?.with_redundant(32, None)?;
//! let outcome = fabric.simulate_step(&StepInput {
//!     phase: Phase::Decode,
//!     batch: &batch,
//!     routing: &routing,
//!     mtp_routing: None,
//!     placements: std::slice::from_ref(&placement),
//!     schedule: Schedule::TwoBatchOverlap,
//!     mtp: false,
//!     record_trace: true,
//! })?;
//! assert!(outcome.duration_us > 0.0);
//! let json = outcome.trace.map(|t| t.to_chrome_json()).unwrap_or_default();
//! assert!(json.starts_with('{'));
//! // A 4,989-token prefilled request's KV cache: 4,989 × 70,272 bytes over one NIC.
//! let kv = fabric.kv_transfer(4989, false, true);
//! assert_eq!(kv.bytes, 4989.0 * 70_272.0);
//! # Ok(())
//! # }
//! ```

mod ahead;
mod analysis;
mod batch;
mod cost;
mod error;
mod exec;
mod fabric;
mod link;
mod named;
mod network;
mod placement;
mod plan;
mod profile;
mod routing;
mod scenario;
pub mod schedule;
mod shape;
mod step;
mod sweep;
mod synthetic;
mod tally;
mod topology;
mod trace;

pub use analysis::{PaperAnalysis, PaperAssumptions, paper_analysis};
pub use batch::{AttentionLoad, Phase, RankBatch, RequestSlot, StepBatch};
pub use cost::{CostModel, Roofline, StageCost};
pub use error::FabricError;
pub use fabric::{
    DISPATCH_SCALE_BYTES_PER_128, Fabric, FabricConfig, KvTransfer, MAX_DEFAULT_PLAN_THREADS, Mode,
};
pub use link::{LinkSim, Transfer, TransferId};
pub use network::{CollectiveKind, CollectiveResult, LinkBusy, simultaneous_finish};
pub use placement::ExpertPlacement;
pub use plan::{DispatchPath, Flow, FlowSet, PackedFlow, TrafficPlan};
pub use profile::{
    AnalysisLink, Efficiency, GpuSpec, HardwareProfile, NodeSpec, ScaleOutSpec, ScaleUpSpec,
};
pub use routing::LayerRouting;
pub use scenario::{
    BatchSpec, EfficiencyOverrides, PlacementSpec, RoutingKindName, RoutingSpec, Scenario,
    ScenarioRun, expert_loads,
};
pub use schedule::{Schedule, StageKind};
pub use shape::{BF16_BYTES, FP8_BYTES, ModelShape};
pub use step::{CollectiveTiming, StepInput, StepOutcome};
pub use sweep::{
    DEEPEP_LOW_LATENCY_V1, DeepEpRow, SweepPoint, deepep_comparison, default_redundancy, ep_sweep,
    isolated_collective_us,
};
pub use synthetic::{RoutingKind, SyntheticRouting};
pub use topology::{LinkClass, Topology};
pub use trace::{CommSlice, ComputeSlice, LinkSlice, Trace};
