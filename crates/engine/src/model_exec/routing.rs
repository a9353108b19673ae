//! What a model step tells the fabric: which request each computed token belongs to (its DP rank,
//! micro-batch and context) and the real expert choices of every MoE layer for those tokens.
//!
//! Rows: the main model's tokens of the step are numbered in execution order (micro-batch 0's
//! forward, then micro-batch 1's when the executor runs them separately; within a forward, the
//! flattened batch order). Every entry of [`StepRouting::layers`] routes exactly those rows;
//! [`StepRouting::mtp`] routes the MTP module's rows, numbered the same way over the MTP forwards.
//! [`RoutedRequest::rows`] and [`RoutedRequest::mtp_rows`] locate one request's tokens.

use std::ops::Range;

use pdserve_model::{LayerRouting, Routing, RoutingTrace};

use crate::sequence::RequestId;

/// One request's part in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutedRequest {
    /// The request.
    pub id: RequestId,
    /// Its DP attention rank (GPU of the EP group).
    pub rank: u32,
    /// Its micro-batch (0 or 1; 0 when two-batch overlap is off).
    pub micro_batch: u8,
    /// Tokens in its KV cache before the step (the position of its first new token).
    pub cached_tokens: usize,
    /// Its rows of the main model's tokens.
    pub rows: Range<usize>,
    /// Its rows of the MTP module's tokens (empty when the MTP module did not run for it).
    pub mtp_rows: Range<usize>,
}

/// The routing of one executed step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepRouting {
    /// Requests of the step, in execution order.
    pub requests: Vec<RoutedRequest>,
    /// Main-model rows in the step.
    pub num_rows: usize,
    /// MTP rows in the step.
    pub num_mtp_rows: usize,
    /// Every MoE layer of the main model, in layer order, each routing all `num_rows` rows.
    pub layers: Vec<LayerRouting>,
    /// The MTP module's MoE layer, routing all `num_mtp_rows` rows (`None` when it did not run).
    pub mtp: Option<LayerRouting>,
    /// The expert placement the step ran with, one per MoE layer (main layers, then the MTP
    /// layer), when the expert backend decides it (the EP runtime); `None`: the clock's own.
    pub placements: Option<Vec<pdserve_fabric::ExpertPlacement>>,
    /// The GPU that served each (row, expert) pair, one vector per MoE layer (main layers, then
    /// the MTP layer), `top_k` per row in the order of `layers` / `mtp`, when the expert backend
    /// moved the rows (the EP runtime's replica choices, in `placements`); `None`: the clock
    /// chooses replicas itself.
    pub served_gpus: Option<Vec<Vec<u32>>>,
}

impl StepRouting {
    /// Appends one main forward's trace (its rows follow the rows already present).
    pub(crate) fn push_main(&mut self, trace: RoutingTrace, rows: usize) {
        append_layers(&mut self.layers, trace.layers, self.num_rows == 0);
        self.num_rows += rows;
    }

    /// Appends one MTP forward's trace.
    pub(crate) fn push_mtp(&mut self, trace: RoutingTrace, rows: usize) {
        if let Some(layer) = trace.layers.into_iter().next() {
            match self.mtp.as_mut() {
                Some(existing) => extend(&mut existing.routing, layer.routing),
                None => self.mtp = Some(layer),
            }
        }
        self.num_mtp_rows += rows;
    }

    /// Tokens sent to each of `n_experts` experts in each main MoE layer (expert load of the step).
    pub fn expert_counts(&self, n_experts: usize) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.routing.expert_counts(n_experts))
            .collect()
    }
}

fn extend(into: &mut Routing, from: Routing) {
    into.ids.extend(from.ids);
    into.weights.extend(from.weights);
}

fn append_layers(into: &mut Vec<LayerRouting>, from: Vec<LayerRouting>, first: bool) {
    if first || into.is_empty() {
        *into = from;
        return;
    }
    for (existing, layer) in into.iter_mut().zip(from) {
        extend(&mut existing.routing, layer.routing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(index: usize, ids: Vec<u32>) -> LayerRouting {
        let weights = vec![1.0; ids.len()];
        LayerRouting {
            layer: index,
            routing: Routing {
                top_k: 2,
                ids,
                weights,
            },
        }
    }

    #[test]
    fn forwards_concatenate_rows_per_layer() {
        let mut r = StepRouting::default();
        r.push_main(
            RoutingTrace {
                layers: vec![layer(1, vec![0, 1]), layer(2, vec![2, 3])],
            },
            1,
        );
        r.push_main(
            RoutingTrace {
                layers: vec![layer(1, vec![4, 5, 6, 7]), layer(2, vec![0, 2, 4, 6])],
            },
            2,
        );
        assert_eq!(r.num_rows, 3);
        assert_eq!(r.layers[0].routing.ids, vec![0, 1, 4, 5, 6, 7]);
        assert_eq!(r.layers[1].routing.tokens(), 3);
        assert_eq!(r.expert_counts(8)[1], vec![1, 0, 2, 1, 1, 0, 1, 0]);
        r.push_mtp(
            RoutingTrace {
                layers: vec![layer(3, vec![1, 2])],
            },
            1,
        );
        r.push_mtp(RoutingTrace::default(), 0);
        assert_eq!(r.mtp.as_ref().map(|l| l.routing.tokens()), Some(1));
    }
}
