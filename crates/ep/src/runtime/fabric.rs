//! Conversions from the runtime's view into the fabric's types, so the step clock charges the
//! placement and routing the runtime really used.
//!
//! - `pdserve_fabric::ExpertPlacement::try_from(&ExpertPlacement)`: expert → distinct GPUs
//!   ([`ExpertPlacement::ranks_of_experts`]; a rank holding two slots of one expert is listed
//!   once, as the fabric requires).
//! - [`LayerTraffic::fabric_routing`]: the layer's logical routing per source rank.
//!
//! What the fabric decides by itself: which replica a token uses. The fabric's traffic plan picks
//! the copy on the token's own GPU, else one in its NVLink domain, else a round robin; the runtime
//! uses [`ExpertPlacement::select_replica`] (round robin over all replicas by default, or
//! node-local). Both place the same experts on the same GPUs, so expert compute and its balance
//! match; the fabric's dispatch can be lighter than the runtime's recorded
//! [`LayerTraffic::dispatch`] whenever a token has a local replica that round robin passed over.
//! The recorded matrices are the exact real traffic.

use pdserve_fabric::{FabricError, LayerRouting};

use super::traffic::LayerTraffic;
use crate::ExpertPlacement;

impl TryFrom<&ExpertPlacement> for pdserve_fabric::ExpertPlacement {
    type Error = FabricError;

    fn try_from(placement: &ExpertPlacement) -> Result<Self, FabricError> {
        Self::new(placement.num_ranks() as u32, placement.ranks_of_experts())
    }
}

impl TryFrom<ExpertPlacement> for pdserve_fabric::ExpertPlacement {
    type Error = FabricError;

    fn try_from(placement: ExpertPlacement) -> Result<Self, FabricError> {
        Self::try_from(&placement)
    }
}

impl LayerTraffic {
    /// The layer's routing as the fabric takes it: each rank's tokens in the order they appeared
    /// (forward by forward, row by row), `top_k` logical expert ids each.
    pub fn fabric_routing(&self) -> Result<LayerRouting, FabricError> {
        let tokens: Vec<u32> = self.tokens_per_rank.iter().map(|&t| t as u32).collect();
        let mut experts = Vec::with_capacity(self.routing_by_rank.iter().map(Vec::len).sum());
        for ids in &self.routing_by_rank {
            for &e in ids {
                let e = u16::try_from(e).map_err(|_| {
                    FabricError::invalid(
                        "routing",
                        "experts",
                        format!("expert id {e} does not fit the fabric's 16-bit ids"),
                    )
                })?;
                experts.push(e);
            }
        }
        LayerRouting::new(self.top_k, &tokens, experts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlacementConfig;

    #[test]
    fn fabric_placement_lists_each_gpu_of_an_expert_once() {
        // 4 experts, 2 redundant, 2 ranks of 3 slots: expert 0 twice on rank 0 and once on rank 1.
        let cfg = PlacementConfig {
            num_ranks: 2,
            num_logical_experts: 4,
            num_redundant_experts: 2,
            physical_to_logical: Some(vec![0, 0, 1, 2, 3, 0]),
            ..PlacementConfig::default()
        };
        let placement = ExpertPlacement::from_config(&cfg).unwrap();
        let fabric = pdserve_fabric::ExpertPlacement::try_from(&placement).unwrap();
        assert_eq!(fabric.num_gpus(), 2);
        assert_eq!(fabric.gpus_of(0), &[0, 1]);
        assert_eq!(fabric.gpus_of(3), &[1]);
        assert_eq!(
            fabric.total_slots(),
            5,
            "the double slot on rank 0 counts once"
        );
    }

    #[test]
    fn fabric_routing_keeps_tokens_grouped_by_rank() {
        let mut t = LayerTraffic::new(1, 2, 2, 512);
        t.tokens_per_rank = vec![1, 2];
        t.routing_by_rank = vec![vec![3, 4], vec![0, 1, 5, 6]];
        let r = t.fabric_routing().unwrap();
        assert_eq!(r.tokens_of(1), 2);
        assert_eq!(r.experts_of(1, 1..2), &[5, 6]);
    }
}
