//! Serde configuration of an EP group's expert layout.
//!
//! [`PlacementConfig`] is what an operator writes (TOML/JSON); [`super::ExpertPlacement`] is the
//! validated, indexed form the runtime uses. Defaults describe one 8-GPU node serving
//! DeepSeek-V3's 256 routed experts with no redundancy, the shared expert on every rank.

use serde::{Deserialize, Serialize};

/// Where the shared expert runs.
///
/// DeepSeek's production deployments (Day 6 overview: prefill EP32, decode EP144) host one copy of
/// the shared expert on every GPU, so a token's shared-expert FFN runs on its own DP rank and never
/// crosses the fabric. The V3 technical report's EP320 decode instead dedicated ranks to the shared
/// (and redundant) experts and dispatched tokens to them like a routed expert ("each token will
/// select 9 experts").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SharedExpertPlacement {
    /// Every rank holds the shared expert and runs it for its own tokens.
    #[default]
    EveryRank,
    /// Only these ranks hold the shared expert; tokens are dispatched to one of them.
    DedicatedRanks {
        /// The EP ranks that hold the shared expert (non-empty, distinct, each `< num_ranks`).
        ranks: Vec<usize>,
    },
}

/// How a token picks one physical replica of a logical expert that has several.
///
/// Both choices are pure functions of `(logical expert, token index, source rank)`; see
/// [`super::ExpertPlacement::select_replica`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaPolicy {
    /// Replica number `(source_rank + token_index) mod replica_count`, counted over all replicas
    /// in ascending physical id. Spreads an expert's tokens evenly over its replicas, which is the
    /// split EPLB assumes when it divides an expert's load by its replica count.
    #[default]
    TokenRoundRobin,
    /// The same round robin, restricted to replicas on the source rank's node when there is at
    /// least one (all replicas otherwise). Saves inter-node (IB) traffic, but an expert whose
    /// replicas sit unevenly across nodes then receives an uneven split.
    NodeLocalRoundRobin,
}

/// The expert layout of one EP group, as configured.
///
/// Physical expert slot `p` lives on rank `p / experts_per_rank`, where
/// `experts_per_rank = (num_logical_experts + num_redundant_experts) / num_ranks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// EP ranks (GPUs) in the group, e.g. 32 for DeepSeek's prefill, 144 for its decode.
    pub num_ranks: usize,
    /// GPUs per node (8 on H800 servers). When `num_ranks` exceeds it, it must divide `num_ranks`.
    pub gpus_per_node: usize,
    /// Logical routed experts per MoE layer (256 for DeepSeek-V3).
    pub num_logical_experts: usize,
    /// Extra physical slots per layer that hold replicas of hot experts (32 in DeepSeek's
    /// production prefill and decode). `num_logical_experts + num_redundant_experts` must be a
    /// multiple of `num_ranks`.
    pub num_redundant_experts: usize,
    /// Where the shared expert runs.
    pub shared_expert: SharedExpertPlacement,
    /// How a token picks among an expert's replicas.
    pub replica_policy: ReplicaPolicy,
    /// Explicit logical expert of each physical slot (length `num_logical_experts +
    /// num_redundant_experts`), the same for every layer. When absent, slot `p` holds logical
    /// expert `p mod num_logical_experts`: experts in order, then the redundant slots replicate
    /// experts `0, 1, …` (EPLB replaces this layout once load is known).
    pub physical_to_logical: Option<Vec<usize>>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            num_ranks: 8,
            gpus_per_node: 8,
            num_logical_experts: 256,
            num_redundant_experts: 0,
            shared_expert: SharedExpertPlacement::EveryRank,
            replica_policy: ReplicaPolicy::TokenRoundRobin,
            physical_to_logical: None,
        }
    }
}

impl PlacementConfig {
    /// Physical expert slots per layer.
    pub fn num_physical_experts(&self) -> usize {
        self.num_logical_experts + self.num_redundant_experts
    }

    /// Nodes spanned by the group: `ceil(num_ranks / gpus_per_node)` (1 for a group smaller than
    /// a node).
    pub fn num_nodes(&self) -> usize {
        self.num_ranks.div_ceil(self.gpus_per_node.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_like_json_with_dedicated_shared_ranks_round_trips() {
        let text = r#"{
            "num_ranks": 16,
            "num_redundant_experts": 16,
            "shared_expert": { "kind": "dedicated_ranks", "ranks": [0, 8] },
            "replica_policy": "node_local_round_robin"
        }"#;
        let cfg: PlacementConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg.num_ranks, 16);
        assert_eq!(cfg.gpus_per_node, 8, "unset fields take defaults");
        assert_eq!(cfg.num_physical_experts(), 272);
        assert_eq!(cfg.num_nodes(), 2);
        assert_eq!(
            cfg.shared_expert,
            SharedExpertPlacement::DedicatedRanks { ranks: vec![0, 8] }
        );
        let back: PlacementConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = serde_json::from_str::<PlacementConfig>(r#"{"num_rank": 8}"#).unwrap_err();
        assert!(err.to_string().contains("num_rank"), "{err}");
    }

    #[test]
    fn group_smaller_than_a_node_spans_one_node() {
        let cfg = PlacementConfig {
            num_ranks: 4,
            ..PlacementConfig::default()
        };
        assert_eq!(cfg.num_nodes(), 1);
    }
}
