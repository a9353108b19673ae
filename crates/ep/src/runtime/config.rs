//! Serde configuration of an EP group's runtime.
//!
//! One struct per component (`deny_unknown_fields`, a doc comment per field, `Default`). The EP
//! size `D` is `placement.num_ranks`, and where the shared expert runs is
//! `placement.shared_expert`: the placement config already holds both, so they are not repeated
//! here ([`EpRuntimeConfig::ep_size`] reads the former).
//!
//! ```toml
//! compute_threads = 1            # OS threads for the ranks' expert compute (1: the caller's)
//!
//! [placement]                    # the EP size D is num_ranks; where the shared expert runs is here
//! num_ranks = 32
//! num_redundant_experts = 32     # (256 + 32) / 32 = 9 slots per rank
//! shared_expert = { kind = "every_rank" }
//! replica_policy = "token_round_robin"
//!
//! [rebalancer]
//! period_steps = 1000            # 0: only the initial placement
//! policy = "auto"                # hierarchical at small EP, global at large EP
//! num_expert_groups = 8          # must equal the checkpoint's n_group
//! window = { kind = "exponential_decay", half_life_steps = 1000.0 }
//! initial_load_file = "loads/decode.json"
//! ```

use serde::{Deserialize, Serialize};

use crate::{PlacementConfig, RebalancerConfig};

/// Configuration of an [`super::EpGroup`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpRuntimeConfig {
    /// The group and its expert layout: `num_ranks` is the EP size `D` (each rank one simulated
    /// GPU: a DP attention rank and an EP rank), `num_redundant_experts` the redundant slots,
    /// `shared_expert` where the shared expert runs, `replica_policy` how tokens pick replicas.
    /// `num_logical_experts` must equal the checkpoint's `n_routed_experts`.
    pub placement: PlacementConfig,
    /// When EPLB re-plans (`period_steps`, 0 = never), with which policy, over which load window,
    /// and the load file of the initial placement. `num_expert_groups` must equal the
    /// checkpoint's `n_group` (hierarchical EPLB keeps the routing groups on nodes).
    pub rebalancer: RebalancerConfig,
    /// OS threads that run the ranks' expert compute in one forward: 1 runs every rank in the
    /// caller's thread, one grouped call per rank in rank order (the default: on a 2-core host
    /// candle's own matmul threads already use the cores, see `docs/eplb.md`); `n > 1` spreads
    /// the ranks over `n` scoped threads. The result does not depend on it.
    pub compute_threads: usize,
}

impl Default for EpRuntimeConfig {
    fn default() -> Self {
        Self {
            placement: PlacementConfig::default(),
            rebalancer: RebalancerConfig::default(),
            compute_threads: 1,
        }
    }
}

impl EpRuntimeConfig {
    /// The EP size `D` (`placement.num_ranks`).
    pub fn ep_size(&self) -> usize {
        self.placement.num_ranks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_toml_example_parses() {
        let doc = include_str!("config.rs");
        let start = doc.find("//! ```toml").unwrap();
        let text: String = doc[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let cfg: EpRuntimeConfig = toml::from_str(&text).unwrap();
        assert_eq!(cfg.ep_size(), 32);
        assert_eq!(cfg.rebalancer.period_steps, 1000);
        assert!(cfg.rebalancer.initial_load_file.is_some());
    }

    #[test]
    fn unset_fields_take_defaults_and_unknown_fields_are_rejected() {
        let cfg: EpRuntimeConfig = serde_json::from_str(
            r#"{"placement": {"num_ranks": 32, "num_redundant_experts": 32}}"#,
        )
        .unwrap();
        assert_eq!(cfg.ep_size(), 32);
        assert_eq!(cfg.compute_threads, 1);
        assert_eq!(cfg.rebalancer, RebalancerConfig::default());
        let err = serde_json::from_str::<EpRuntimeConfig>(r#"{"ep_size": 8}"#).unwrap_err();
        assert!(err.to_string().contains("ep_size"), "{err}");
    }
}
