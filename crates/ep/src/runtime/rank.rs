//! EP ranks: the routed-expert weights each simulated GPU holds, per MoE layer.
//!
//! A rank holds, for every MoE layer, the logical experts of its physical slots
//! ([`crate::ExpertPlacement::logical_on_rank`]): its "HBM" is one [`ExpertBank`], the distinct
//! experts' weights stacked for grouped execution (two slots of one expert share one copy); no
//! other copy is kept. Redundant replicas are real duplicates: two ranks that host expert `e`
//! each load (or receive) their own copy.
//!
//! Invariants: a [`RankLayer`]'s bank holds its distinct experts in ascending id; every rank has at
//! least one expert per layer (a placement gives every rank `(N + R) / D ≥ 1` slots).
//!
//! Rebalancing ([`rebuild_ranks`]) keeps the weights a rank already holds and copies every newly
//! needed expert from a rank that held it before (one on the same node when there is one, else the
//! lowest rank), reading them out of the old banks: weights move between ranks as they would
//! between GPUs, never from the checkpoint, and the bytes moved are reported per (source,
//! destination).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{Device, Tensor};
use pdserve_model::{Checkpoint, ExpertBank};

use super::error::EpRuntimeError;
use crate::ExpertPlacement;

/// One routed expert's weights, `(gate_up [hidden, 2·inter], down [inter, hidden])`: the layout
/// [`ExpertBank::from_weights`] takes.
type ExpertWeights = (Tensor, Tensor);

/// Widths of one routed expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExpertShape {
    /// Model hidden size.
    pub hidden: usize,
    /// Expert intermediate size (`moe_intermediate_size`).
    pub inter: usize,
}

impl ExpertShape {
    /// Bytes of one expert's weights in f32 (gate, up and down).
    pub fn bytes(&self) -> u64 {
        (3 * self.hidden * self.inter * 4) as u64
    }
}

/// One rank's experts of one MoE layer.
#[derive(Debug, Clone)]
pub struct RankLayer {
    slots: Range<usize>,
    bank: ExpertBank,
}

impl RankLayer {
    /// Stacks `weights` (ascending id) into the rank's bank; the inputs are dropped after.
    fn from_weights(
        slots: Range<usize>,
        weights: BTreeMap<u32, ExpertWeights>,
    ) -> Result<Self, EpRuntimeError> {
        let ids: Vec<u32> = weights.keys().copied().collect();
        let (gate_up, down): (Vec<Tensor>, Vec<Tensor>) = weights.into_values().unzip();
        let bank = ExpertBank::from_weights(&ids, &gate_up, &down)?;
        Ok(Self { slots, bank })
    }

    /// Expert `id`'s weights as views into this rank's bank.
    fn expert_weights(&self, id: u32) -> Option<Result<ExpertWeights, EpRuntimeError>> {
        self.bank
            .expert_weights(id)
            .map(|w| w.map_err(EpRuntimeError::from))
    }

    /// The physical slots this rank holds in this layer.
    pub fn slots(&self) -> Range<usize> {
        self.slots.clone()
    }

    /// The distinct logical experts held, ascending.
    pub fn experts(&self) -> &[u32] {
        self.bank.ids()
    }

    /// The grouped executor of these experts.
    pub fn bank(&self) -> &ExpertBank {
        &self.bank
    }
}

/// One simulated GPU of the group: its experts of every MoE layer.
#[derive(Debug, Clone)]
pub struct EpRank {
    rank: usize,
    layers: Vec<RankLayer>,
}

impl EpRank {
    /// The rank's index in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The rank's experts of the `moe_index`-th MoE layer.
    pub fn layer(&self, moe_index: usize) -> Option<&RankLayer> {
        self.layers.get(moe_index)
    }

    /// The grouped executor of the `moe_index`-th MoE layer.
    pub(crate) fn bank(&self, moe_index: usize) -> Result<&ExpertBank, EpRuntimeError> {
        self.layer(moe_index).map(RankLayer::bank).ok_or_else(|| {
            EpRuntimeError::field(
                "placements",
                format!(
                    "rank {} has no experts for MoE layer {moe_index}",
                    self.rank
                ),
            )
        })
    }
}

/// The distinct logical experts of `rank`'s slots, ascending.
fn experts_of_rank(placement: &ExpertPlacement, rank: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = placement
        .logical_on_rank(rank)
        .iter()
        .map(|&e| e as u32)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Loads every rank's experts of every MoE layer from the checkpoint: `placements[i]` is the
/// layout of model layer `moe_layers[i]`. Each rank reads its own copy of each of its experts.
pub(crate) fn load_ranks(
    ckpt: &Checkpoint,
    placements: &[ExpertPlacement],
    moe_layers: &[usize],
    device: &Device,
) -> Result<Vec<EpRank>, EpRuntimeError> {
    let num_ranks = placements.first().map_or(0, ExpertPlacement::num_ranks);
    let mut ranks: Vec<EpRank> = (0..num_ranks)
        .map(|rank| EpRank {
            rank,
            layers: Vec::with_capacity(placements.len()),
        })
        .collect();
    for (placement, &layer) in placements.iter().zip(moe_layers) {
        for (rank, ep_rank) in ranks.iter_mut().enumerate() {
            let mut weights = BTreeMap::new();
            for id in experts_of_rank(placement, rank) {
                weights.insert(id, ExpertBank::load_expert(ckpt, layer, id, device)?);
            }
            ep_rank.layers.push(RankLayer::from_weights(
                placement.physical_on_rank(rank),
                weights,
            )?);
        }
    }
    Ok(ranks)
}

/// Expert copies moved between ranks by a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightMoves {
    num_ranks: usize,
    /// `experts[src × D + dst]`: expert copies sent from `src` to `dst`.
    experts: Vec<u64>,
    /// Bytes of one expert's weights (f32, real shape).
    expert_bytes: u64,
}

impl WeightMoves {
    fn new(num_ranks: usize, expert_bytes: u64) -> Self {
        Self {
            num_ranks,
            experts: vec![0; num_ranks * num_ranks],
            expert_bytes,
        }
    }

    /// Expert copies sent from `src` to `dst` (0 outside the group).
    pub fn experts(&self, src: usize, dst: usize) -> u64 {
        if src < self.num_ranks && dst < self.num_ranks {
            self.experts[src * self.num_ranks + dst]
        } else {
            0
        }
    }

    /// Expert copies moved in all.
    pub fn total_experts(&self) -> u64 {
        self.experts.iter().sum()
    }

    /// Bytes moved in all at the real shape (f32 weights).
    pub fn total_bytes(&self) -> u64 {
        self.total_experts() * self.expert_bytes
    }
}

/// The ranks for `placements` (one per MoE layer, same order as the old ranks' layers), built
/// from `old`: kept experts stay, new ones are copied from a previous holder (see module doc).
pub(crate) fn rebuild_ranks(
    old: &[EpRank],
    old_placements: &[ExpertPlacement],
    placements: &[ExpertPlacement],
    expert_bytes: u64,
) -> Result<(Vec<EpRank>, WeightMoves), EpRuntimeError> {
    let num_ranks = old.len();
    let mut moves = WeightMoves::new(num_ranks, expert_bytes);
    let mut ranks: Vec<EpRank> = (0..num_ranks)
        .map(|rank| EpRank {
            rank,
            layers: Vec::with_capacity(placements.len()),
        })
        .collect();
    for (moe, (placement, old_placement)) in placements.iter().zip(old_placements).enumerate() {
        // Previous holders of each expert, ascending rank.
        let holders = old_placement.ranks_of_experts();
        for (rank, new_rank) in ranks.iter_mut().enumerate() {
            let old_layer = &old[rank].layers[moe];
            let mut weights = BTreeMap::new();
            for id in experts_of_rank(placement, rank) {
                // Kept or copied, the weights are stacked into the new bank (new storage).
                let w = match old_layer.expert_weights(id) {
                    Some(w) => w?,
                    None => {
                        let candidates = holders.get(id as usize).map(Vec::as_slice).unwrap_or(&[]);
                        let node = placement.node_of_rank(rank);
                        let src = candidates
                            .iter()
                            .copied()
                            .find(|&r| placement.node_of_rank(r as usize) == node)
                            .or_else(|| candidates.first().copied())
                            .ok_or_else(|| {
                                EpRuntimeError::field(
                                    "placements",
                                    format!("expert {id} has no holder in the current placement"),
                                )
                            })? as usize;
                        let w = old[src].layers[moe].expert_weights(id).ok_or_else(|| {
                            EpRuntimeError::field(
                                "placements",
                                format!(
                                    "rank {src} should hold expert {id} of MoE layer {moe} \
                                     but does not"
                                ),
                            )
                        })??;
                        moves.experts[src * num_ranks + rank] += 1;
                        w
                    }
                };
                weights.insert(id, w);
            }
            new_rank.layers.push(RankLayer::from_weights(
                placement.physical_on_rank(rank),
                weights,
            )?);
        }
    }
    Ok((ranks, moves))
}
