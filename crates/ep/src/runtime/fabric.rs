//! Conversions from the runtime's view into the fabric's types, so the step clock charges the
//! placement, routing and replica choices the runtime really used.
//!
//! - `pdserve_fabric::ExpertPlacement::try_from(&ExpertPlacement)`: expert → distinct GPUs
//!   ([`ExpertPlacement::ranks_of_experts`]; a rank holding two slots of one expert is listed
//!   once, as the fabric requires).
//! - [`LayerTraffic::fabric_routing`]: the layer's logical routing per source rank, with the rank
//!   that served each (token, expert) pair ([`LayerRouting::with_gpus`]). The fabric's own replica
//!   rule (the copy on the token's GPU, else one in its NVLink domain, else a round robin) differs
//!   from the runtime's [`ExpertPlacement::select_replica`] (round robin over all replicas by
//!   default, or node-local), so the served ranks are what make the priced dispatch and combine
//!   the traffic [`LayerTraffic::dispatch`] recorded, copy for copy.

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
    /// (forward by forward, row by row), `top_k` logical expert ids each, and the rank that served
    /// each of them.
    pub fn fabric_routing(&self) -> Result<LayerRouting, FabricError> {
        let tokens: Vec<u32> = self.tokens_per_rank.iter().map(|&t| t as u32).collect();
        let mut served: Vec<Vec<u32>> = vec![Vec::new(); tokens.len()];
        let rows = self.served_ranks.chunks(self.top_k.max(1));
        for (&src, row) in self.source_ranks.iter().zip(rows) {
            if let Some(s) = served.get_mut(src as usize) {
                s.extend_from_slice(row);
            }
        }
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
        LayerRouting::new(self.top_k, &tokens, experts)?.with_gpus(served.concat())
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
    fn fabric_routing_keeps_tokens_grouped_by_rank_with_their_served_ranks() {
        let mut t = LayerTraffic::new(1, 2, 2, 512);
        t.tokens_per_rank = vec![1, 2];
        t.routing_by_rank = vec![vec![3, 4], vec![0, 1, 5, 6]];
        // Rows in forward order: rank 1, rank 0, rank 1.
        t.source_ranks = vec![1, 0, 1];
        t.served_ranks = vec![0, 0, 1, 1, 1, 0];
        let r = t.fabric_routing().unwrap();
        assert_eq!(r.tokens_of(1), 2);
        assert_eq!(r.experts_of(1, 1..2), &[5, 6]);
        assert_eq!(r.gpus_of(0, 0..1), Some(&[1, 1][..]));
        assert_eq!(r.gpus_of(1, 0..2), Some(&[0, 0, 1, 0][..]));
    }
}
