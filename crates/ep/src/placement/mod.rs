//! Expert placement: which GPU (EP rank) holds which expert, for one MoE layer.
//!
//! An EP group of `D` ranks serves `N` logical routed experts through `N + R` physical slots, `R`
//! of them redundant copies of hot experts. Every rank holds exactly `(N + R) / D` slots: slot `p`
//! lives on rank `p / ((N + R) / D)`, so a rank's experts are a contiguous run of slots.
//!
//! Invariants of a constructed [`ExpertPlacement`] (checked by every constructor, so the runtime
//! never re-checks them):
//! - `(N + R) % D == 0`, and `D` is a multiple of `gpus_per_node` when larger than it;
//! - every physical slot holds a logical expert `< N`, and every logical expert has at least one
//!   replica;
//! - `replicas(e)` lists exactly the slots whose logical expert is `e`, in ascending order;
//! - dedicated shared-expert ranks, if any, are distinct and `< D`.
//!
//! A rank may hold two slots of one expert (EPLB does not prevent it, and a very hot expert can
//! have more replicas than there are GPUs); it then receives two shares of that expert's tokens.

mod config;

pub use config::{PlacementConfig, ReplicaPolicy, SharedExpertPlacement};

use std::ops::Range;

use crate::EpError;
use crate::eplb::EplbPlan;

/// The validated expert layout of one MoE layer of one EP group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    num_ranks: usize,
    gpus_per_node: usize,
    num_logical_experts: usize,
    shared_expert: SharedExpertPlacement,
    replica_policy: ReplicaPolicy,
    physical_to_logical: Vec<usize>,
    logical_to_physical: Vec<Vec<usize>>,
}

impl ExpertPlacement {
    /// `num_logical_experts` experts split in contiguous runs over `num_ranks` ranks, no
    /// redundancy, 8 GPUs per node, the shared expert on every rank.
    ///
    /// Fails when `num_ranks` does not divide `num_logical_experts`, or is larger than a node and
    /// not a multiple of 8.
    pub fn contiguous(num_logical_experts: usize, num_ranks: usize) -> Result<Self, EpError> {
        Self::from_config(&PlacementConfig {
            num_ranks,
            num_logical_experts,
            ..PlacementConfig::default()
        })
    }

    /// The layout a config describes: its explicit `physical_to_logical` map, or slot `p` holding
    /// logical expert `p mod num_logical_experts` when the map is absent.
    pub fn from_config(config: &PlacementConfig) -> Result<Self, EpError> {
        let map = match &config.physical_to_logical {
            Some(map) => map.clone(),
            None => (0..config.num_physical_experts())
                .map(|p| p % config.num_logical_experts.max(1))
                .collect(),
        };
        Self::with_map(config, map, "placement.physical_to_logical")
    }

    /// The layout an EPLB plan computed for one layer, in the group shape of `config` (its own
    /// `physical_to_logical`, if any, is ignored: the plan replaces it).
    ///
    /// Checks that the plan's three views agree (replica lists and counts match the map).
    pub fn from_eplb(config: &PlacementConfig, plan: &EplbPlan) -> Result<Self, EpError> {
        let placement = Self::with_map(
            config,
            plan.physical_to_logical.clone(),
            "eplb.physical_to_logical",
        )?;
        if plan.replica_counts.len() != placement.num_logical_experts
            || plan.logical_to_physical.len() != placement.num_logical_experts
        {
            return Err(EpError::field(
                "eplb.replica_counts",
                format!(
                    "plan lists {} replica counts and {} replica lists for {} logical experts",
                    plan.replica_counts.len(),
                    plan.logical_to_physical.len(),
                    placement.num_logical_experts
                ),
            ));
        }
        for (expert, replicas) in placement.logical_to_physical.iter().enumerate() {
            let mut planned = plan.logical_to_physical[expert].clone();
            planned.sort_unstable();
            if planned != *replicas || plan.replica_counts[expert] != replicas.len() {
                return Err(EpError::field(
                    format!("eplb.logical_to_physical[{expert}]"),
                    format!(
                        "plan lists replicas {planned:?} (count {}) but its map places the expert \
                         on {replicas:?}",
                        plan.replica_counts[expert]
                    ),
                ));
            }
        }
        Ok(placement)
    }

    fn with_map(
        config: &PlacementConfig,
        physical_to_logical: Vec<usize>,
        map_field: &str,
    ) -> Result<Self, EpError> {
        validate_shape(config)?;
        let num_physical = config.num_physical_experts();
        if physical_to_logical.len() != num_physical {
            return Err(EpError::field(
                map_field,
                format!(
                    "has {} entries, expected num_logical_experts + num_redundant_experts = {}",
                    physical_to_logical.len(),
                    num_physical
                ),
            ));
        }
        let mut logical_to_physical = vec![Vec::new(); config.num_logical_experts];
        for (physical, &logical) in physical_to_logical.iter().enumerate() {
            let replicas =
                logical_to_physical
                    .get_mut(logical)
                    .ok_or_else(|| EpError::ExpertOutOfRange {
                        field: format!("{map_field}[{physical}]"),
                        expert: logical,
                        limit: config.num_logical_experts,
                    })?;
            replicas.push(physical);
        }
        if let Some(expert) = logical_to_physical.iter().position(Vec::is_empty) {
            return Err(EpError::ExpertWithoutReplica {
                field: map_field.to_owned(),
                expert,
            });
        }
        Ok(Self {
            num_ranks: config.num_ranks,
            gpus_per_node: config.gpus_per_node,
            num_logical_experts: config.num_logical_experts,
            shared_expert: config.shared_expert.clone(),
            replica_policy: config.replica_policy,
            physical_to_logical,
            logical_to_physical,
        })
    }

    /// The config that rebuilds this placement exactly (with an explicit map).
    pub fn to_config(&self) -> PlacementConfig {
        PlacementConfig {
            num_ranks: self.num_ranks,
            gpus_per_node: self.gpus_per_node,
            num_logical_experts: self.num_logical_experts,
            num_redundant_experts: self.num_redundant_experts(),
            shared_expert: self.shared_expert.clone(),
            replica_policy: self.replica_policy,
            physical_to_logical: Some(self.physical_to_logical.clone()),
        }
    }

    /// The same layout with another replica policy.
    #[must_use]
    pub fn with_replica_policy(mut self, policy: ReplicaPolicy) -> Self {
        self.replica_policy = policy;
        self
    }

    /// EP ranks (GPUs) in the group.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// GPUs per node.
    pub fn gpus_per_node(&self) -> usize {
        self.gpus_per_node
    }

    /// Nodes spanned by the group.
    pub fn num_nodes(&self) -> usize {
        self.num_ranks.div_ceil(self.gpus_per_node)
    }

    /// Logical routed experts.
    pub fn num_logical_experts(&self) -> usize {
        self.num_logical_experts
    }

    /// Physical expert slots (logical + redundant).
    pub fn num_physical_experts(&self) -> usize {
        self.physical_to_logical.len()
    }

    /// Redundant physical slots.
    pub fn num_redundant_experts(&self) -> usize {
        self.num_physical_experts() - self.num_logical_experts
    }

    /// Physical expert slots on each rank.
    pub fn experts_per_rank(&self) -> usize {
        self.num_physical_experts() / self.num_ranks
    }

    /// Where the shared expert runs.
    pub fn shared_expert(&self) -> &SharedExpertPlacement {
        &self.shared_expert
    }

    /// How tokens pick among replicas.
    pub fn replica_policy(&self) -> ReplicaPolicy {
        self.replica_policy
    }

    /// Logical expert of every physical slot.
    pub fn physical_to_logical(&self) -> &[usize] {
        &self.physical_to_logical
    }

    /// The physical slots holding `logical`, ascending; `None` when out of range.
    pub fn replicas(&self, logical: usize) -> Option<&[usize]> {
        self.logical_to_physical.get(logical).map(Vec::as_slice)
    }

    /// The distinct ranks holding each logical expert, in ascending slot order (an expert with
    /// two slots on one rank lists the rank once). This is the expert → GPU(s) view that the
    /// fabric's traffic model takes.
    pub fn ranks_of_experts(&self) -> Vec<Vec<u32>> {
        let per = self.experts_per_rank();
        self.logical_to_physical
            .iter()
            .map(|slots| {
                let mut ranks: Vec<u32> = Vec::with_capacity(slots.len());
                for &p in slots {
                    let rank = (p / per) as u32;
                    if !ranks.contains(&rank) {
                        ranks.push(rank);
                    }
                }
                ranks
            })
            .collect()
    }

    /// Replica count of every logical expert.
    pub fn replica_counts(&self) -> Vec<usize> {
        self.logical_to_physical.iter().map(Vec::len).collect()
    }

    /// The rank holding physical slot `physical`; `None` when out of range.
    pub fn rank_of_physical(&self, physical: usize) -> Option<usize> {
        (physical < self.num_physical_experts()).then(|| physical / self.experts_per_rank())
    }

    /// The node of `rank` (ranks fill nodes in order).
    pub fn node_of_rank(&self, rank: usize) -> usize {
        rank / self.gpus_per_node
    }

    /// The physical slots of `rank` (empty when out of range).
    pub fn physical_on_rank(&self, rank: usize) -> Range<usize> {
        let per = self.experts_per_rank();
        let start = rank.saturating_mul(per).min(self.num_physical_experts());
        start..(start + per).min(self.num_physical_experts())
    }

    /// The logical experts `rank` hosts, one per slot (a hot expert may appear twice).
    pub fn logical_on_rank(&self, rank: usize) -> &[usize] {
        &self.physical_to_logical[self.physical_on_rank(rank)]
    }

    /// The ranks that hold the shared expert.
    pub fn shared_expert_ranks(&self) -> Vec<usize> {
        match &self.shared_expert {
            SharedExpertPlacement::EveryRank => (0..self.num_ranks).collect(),
            SharedExpertPlacement::DedicatedRanks { ranks } => ranks.clone(),
        }
    }

    /// The rank that runs the shared expert for token `token_index` of `source_rank`: the source
    /// rank itself when every rank holds it, else the dedicated ranks in round robin by
    /// `source_rank + token_index`.
    pub fn shared_expert_rank(&self, source_rank: usize, token_index: usize) -> usize {
        match &self.shared_expert {
            SharedExpertPlacement::EveryRank => source_rank,
            SharedExpertPlacement::DedicatedRanks { ranks } => {
                ranks[source_rank.wrapping_add(token_index) % ranks.len()]
            }
        }
    }

    /// The physical replica of `logical` that token `token_index` from `source_rank` uses.
    ///
    /// Pure and deterministic. With `n` candidate replicas (all replicas for
    /// [`ReplicaPolicy::TokenRoundRobin`]; those on the source's node, if any, for
    /// [`ReplicaPolicy::NodeLocalRoundRobin`]) in ascending physical id, it returns candidate
    /// number `(source_rank + token_index) mod n`. Adding the source rank spreads the first tokens
    /// of every rank over different replicas, which matters in decode where each rank contributes
    /// only a few tokens per step.
    pub fn select_replica(
        &self,
        logical: usize,
        token_index: usize,
        source_rank: usize,
    ) -> Result<usize, EpError> {
        let replicas = self
            .replicas(logical)
            .ok_or_else(|| EpError::ExpertOutOfRange {
                field: "routing".to_owned(),
                expert: logical,
                limit: self.num_logical_experts,
            })?;
        if source_rank >= self.num_ranks {
            return Err(EpError::field(
                "source_rank",
                format!(
                    "rank {source_rank} is not in an EP group of {}",
                    self.num_ranks
                ),
            ));
        }
        let turn = source_rank.wrapping_add(token_index);
        if self.replica_policy == ReplicaPolicy::NodeLocalRoundRobin {
            let node = self.node_of_rank(source_rank);
            let is_local = |p: &&usize| self.node_of_rank(**p / self.experts_per_rank()) == node;
            let local = replicas.iter().filter(is_local).count();
            if local > 0
                && let Some(&p) = replicas.iter().filter(is_local).nth(turn % local)
            {
                return Ok(p);
            }
        }
        Ok(replicas[turn % replicas.len()])
    }

    /// Maps one rank's routing, logical ids `[n_tokens × k]` row-major, to physical slot ids of the
    /// same shape, token `t` being row `t` (see [`Self::select_replica`]).
    pub fn map_routing(
        &self,
        topk_ids: &[u32],
        k: usize,
        source_rank: usize,
    ) -> Result<Vec<u32>, EpError> {
        check_routing_shape(topk_ids, k)?;
        let mut physical = Vec::with_capacity(topk_ids.len());
        for (token, row) in topk_ids.chunks(k).enumerate() {
            for &logical in row {
                let p = self.select_replica(logical as usize, token, source_rank)?;
                physical.push(p as u32);
            }
        }
        Ok(physical)
    }

    /// Expected tokens each rank receives when logical expert `e` receives `logical_load[e]` tokens
    /// and its replicas share them equally (the split EPLB optimizes for).
    pub fn expected_rank_loads(&self, logical_load: &[f64]) -> Result<Vec<f64>, EpError> {
        if logical_load.len() != self.num_logical_experts {
            return Err(EpError::field(
                "logical_load",
                format!(
                    "has {} entries for {} logical experts",
                    logical_load.len(),
                    self.num_logical_experts
                ),
            ));
        }
        let per = self.experts_per_rank();
        let mut loads = vec![0.0; self.num_ranks];
        for (physical, &logical) in self.physical_to_logical.iter().enumerate() {
            let share = logical_load[logical] / self.logical_to_physical[logical].len() as f64;
            loads[physical / per] += share;
        }
        Ok(loads)
    }

    /// Tokens each rank receives for physical routing ids (as produced by [`Self::map_routing`]).
    pub fn rank_token_counts(&self, physical_ids: &[u32]) -> Result<Vec<u64>, EpError> {
        let per = self.experts_per_rank();
        let mut counts = vec![0_u64; self.num_ranks];
        for &p in physical_ids {
            let rank = (p as usize) / per;
            let slot = counts
                .get_mut(rank)
                .ok_or_else(|| EpError::ExpertOutOfRange {
                    field: "physical_ids".to_owned(),
                    expert: p as usize,
                    limit: self.num_physical_experts(),
                })?;
            *slot += 1;
        }
        Ok(counts)
    }
}

/// Checks that `ids` is a `[n_tokens × k]` matrix.
pub(crate) fn check_routing_shape(ids: &[u32], k: usize) -> Result<(), EpError> {
    if k == 0 || !ids.len().is_multiple_of(k) {
        return Err(EpError::RoutingShape { len: ids.len(), k });
    }
    Ok(())
}

/// Checks the group shape of a config (everything but the map).
pub(crate) fn validate_shape(config: &PlacementConfig) -> Result<(), EpError> {
    if config.num_ranks == 0 {
        return Err(EpError::field("placement.num_ranks", "must be at least 1"));
    }
    if config.gpus_per_node == 0 {
        return Err(EpError::field(
            "placement.gpus_per_node",
            "must be at least 1",
        ));
    }
    if config.num_ranks > config.gpus_per_node
        && !config.num_ranks.is_multiple_of(config.gpus_per_node)
    {
        return Err(EpError::field(
            "placement.gpus_per_node",
            format!(
                "{} does not divide num_ranks = {} (a group larger than a node must fill whole \
                 nodes)",
                config.gpus_per_node, config.num_ranks
            ),
        ));
    }
    if config.num_logical_experts == 0 {
        return Err(EpError::field(
            "placement.num_logical_experts",
            "must be at least 1",
        ));
    }
    if !config
        .num_physical_experts()
        .is_multiple_of(config.num_ranks)
    {
        return Err(EpError::SlotsNotDivisible {
            num_logical_experts: config.num_logical_experts,
            num_redundant_experts: config.num_redundant_experts,
            num_ranks: config.num_ranks,
        });
    }
    if let SharedExpertPlacement::DedicatedRanks { ranks } = &config.shared_expert {
        if ranks.is_empty() {
            return Err(EpError::field(
                "placement.shared_expert.ranks",
                "must name at least one rank",
            ));
        }
        for (i, &rank) in ranks.iter().enumerate() {
            if rank >= config.num_ranks {
                return Err(EpError::field(
                    format!("placement.shared_expert.ranks[{i}]"),
                    format!("rank {rank} is not in an EP group of {}", config.num_ranks),
                ));
            }
            if ranks[..i].contains(&rank) {
                return Err(EpError::field(
                    format!("placement.shared_expert.ranks[{i}]"),
                    format!("rank {rank} is listed twice"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
