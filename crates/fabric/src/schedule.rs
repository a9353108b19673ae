//! Stage programs: the order in which each GPU's compute stream runs a step's stages, which
//! collectives they issue and which they wait for.
//!
//! Every GPU runs the same program (with its own durations). The compute stream runs ops in order;
//! an op starts when the previous op has ended and every collective it waits for has been received
//! on that GPU. An op may trigger a collective, which each GPU issues when the op ends and its comm
//! stream is idle. Collectives are numbered in trigger order, which is also the comm stream's order.
//!
//! Programs:
//! - [`Schedule::TwoBatchOverlap`], decode: DeepSeek's 5-stage pipeline (DAY6 decode figure). Per
//!   layer the compute stream runs `SHARED(0) ATTN-0(1) MLP(0) ATTN-1(1) SHARED(1) ATTN-0(0)'
//!   MLP(1) ATTN-1(0)'` (′ = next layer) while the comm stream runs `DISPATCH(0) COMBINE(0)
//!   DISPATCH(1) COMBINE(1)`.
//! - [`Schedule::TwoBatchOverlap`], prefill: DAY6 prefill figure, `ATTN(1) SHARED(0) ATTN(0)'
//!   MLP(1) MLP(0)' SHARED(1)` against `COMBINE(0) DISPATCH(1) DISPATCH(0)' COMBINE(1)`.
//! - [`Schedule::SingleBatch`]: one batch, no overlap: attention, shared expert, dispatch, MLP,
//!   combine, each waiting for the previous.
//! - [`Schedule::SerialMicroBatches`]: the two micro-batches of TBO run one after the other
//!   without overlap; the baseline that isolates what overlapping buys.
//!
//! Dense layers replace MLP by the dense FFN and have no shared expert and no collectives. The
//! prologue and epilogue are the steady-state cycle with the ops of non-existent layers dropped.
//! Invariant: an op only waits for collectives triggered earlier in the program.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::batch::Phase;
use crate::error::FabricError;
use crate::network::CollectiveKind;

/// How a step's micro-batches use the compute and comm streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// TBO off: the whole batch at once, compute waiting for communication.
    SingleBatch,
    /// Two micro-batches, one after the other, no overlap.
    SerialMicroBatches,
    /// TBO on: DeepSeek's two-micro-batch pipelines.
    TwoBatchOverlap,
}

impl Schedule {
    /// Micro-batches the schedule splits the batch into.
    pub fn micro_batches(self) -> usize {
        match self {
            Schedule::SingleBatch => 1,
            Schedule::SerialMicroBatches | Schedule::TwoBatchOverlap => 2,
        }
    }
}

/// A pipeline stage on the compute stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum StageKind {
    /// Decode: MLA down/up projections (and, in the MTP layer, `eh_proj` and the main LM head).
    Attn0,
    /// Decode: core attention, output projection, gate.
    Attn1,
    /// Prefill: all of attention and the gate.
    Attn,
    /// Shared experts.
    Shared,
    /// Routed experts hosted on the GPU.
    Mlp,
    /// Dense FFN of a dense layer.
    DenseFfn,
    /// Final norm and LM head.
    Head,
}

impl StageKind {
    /// DeepSeek's label.
    pub fn label(self) -> &'static str {
        match self {
            StageKind::Attn0 => "ATTN-0",
            StageKind::Attn1 => "ATTN-1",
            StageKind::Attn => "ATTN",
            StageKind::Shared => "SHARED",
            StageKind::Mlp => "MLP",
            StageKind::DenseFfn => "DENSE",
            StageKind::Head => "HEAD",
        }
    }
}

/// Whether a modeled layer has EP traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerKind {
    Dense,
    /// A MoE layer; the index counts MoE layers from 0 (routing reuse is cyclic over it).
    Moe(usize),
}

pub(crate) const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
pub(crate) struct ComputeOp {
    pub stage: StageKind,
    pub layer: u32,
    pub mb: u8,
    pub waits: [u32; 2],
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CollOp {
    pub kind: CollectiveKind,
    pub layer: u32,
    pub mb: u8,
    pub moe_index: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Program {
    pub ops: Vec<ComputeOp>,
    pub colls: Vec<CollOp>,
    /// `ops` index of each collective's trigger.
    pub trigger_op: Vec<usize>,
}

type Key = (CollectiveKind, u32, u8);

struct Builder<'a> {
    layers: &'a [LayerKind],
    phase: Phase,
    serial: bool,
    program: Program,
    index: HashMap<Key, u32>,
    last_trigger: u32,
}

impl Builder<'_> {
    fn moe(&self, layer: i64) -> Option<usize> {
        match self.layers.get(usize::try_from(layer).ok()?) {
            Some(LayerKind::Moe(i)) => Some(*i),
            _ => None,
        }
    }

    fn exists(&self, layer: i64) -> bool {
        layer >= 0 && (layer as usize) < self.layers.len()
    }

    fn first_attention(&self) -> StageKind {
        match self.phase {
            Phase::Decode => StageKind::Attn0,
            Phase::Prefill => StageKind::Attn,
        }
    }

    fn dispatch_trigger(&self) -> StageKind {
        if self.serial {
            StageKind::Shared
        } else {
            match self.phase {
                Phase::Decode => StageKind::Attn1,
                Phase::Prefill => StageKind::Attn,
            }
        }
    }

    /// Appends `stage` of micro-batch `mb` at `layer` if it exists for that layer's kind.
    fn push(&mut self, stage: StageKind, mb: u8, layer: i64) -> Result<(), FabricError> {
        if !self.exists(layer) && stage != StageKind::Head {
            return Ok(());
        }
        let moe = self.moe(layer);
        let stage = match (stage, moe) {
            (StageKind::Shared, None) => return Ok(()),
            (StageKind::Mlp, None) => StageKind::DenseFfn,
            (s, _) => s,
        };
        let l = layer as u32;
        let mut waits = [NONE; 2];
        let mut want = |k: Option<Key>, slot: usize| -> Result<(), FabricError> {
            if let Some(key) = k {
                let idx = self.index.get(&key).copied().ok_or_else(|| {
                    FabricError::invalid(
                        "schedule",
                        "program",
                        format!("waits for {key:?} before it is issued"),
                    )
                })?;
                waits[slot] = idx;
            }
            Ok(())
        };
        if stage == self.first_attention() && layer > 0 && self.moe(layer - 1).is_some() {
            want(Some((CollectiveKind::Combine, l - 1, mb)), 0)?;
        }
        if stage == StageKind::Mlp {
            want(Some((CollectiveKind::Dispatch, l, mb)), 0)?;
        }
        if stage == StageKind::Head {
            let last = self.layers.len() as i64 - 1;
            if self.moe(last).is_some() {
                want(Some((CollectiveKind::Combine, last as u32, mb)), 0)?;
            }
        }
        if self.serial && self.last_trigger != NONE && waits[0] != self.last_trigger {
            waits[1] = self.last_trigger;
        }
        let trigger_kind = match stage {
            s if s == self.dispatch_trigger() && moe.is_some() => Some(CollectiveKind::Dispatch),
            StageKind::Mlp => Some(CollectiveKind::Combine),
            _ => None,
        };
        let mut trigger = NONE;
        if let (Some(kind), Some(moe_index)) = (trigger_kind, moe) {
            trigger = self.program.colls.len() as u32;
            self.program.colls.push(CollOp {
                kind,
                layer: l,
                mb,
                moe_index,
            });
            self.program.trigger_op.push(self.program.ops.len());
            self.index.insert((kind, l, mb), trigger);
        }
        let layer_out = if stage == StageKind::Head {
            self.layers.len() as u32
        } else {
            l
        };
        self.program.ops.push(ComputeOp {
            stage,
            layer: layer_out,
            mb,
            waits,
        });
        if trigger != NONE {
            self.last_trigger = trigger;
        }
        Ok(())
    }
}

/// The program of one step.
pub(crate) fn build(
    phase: Phase,
    schedule: Schedule,
    layers: &[LayerKind],
) -> Result<Program, FabricError> {
    use StageKind::*;
    let serial = schedule != Schedule::TwoBatchOverlap;
    let mut b = Builder {
        layers,
        phase,
        serial,
        program: Program::default(),
        index: HashMap::new(),
        last_trigger: NONE,
    };
    let n = layers.len() as i64;
    match schedule {
        Schedule::TwoBatchOverlap => {
            for c in -1..n {
                match phase {
                    Phase::Decode => {
                        for (stage, mb, layer) in [
                            (Shared, 0, c),
                            (Attn0, 1, c),
                            (Mlp, 0, c),
                            (Attn1, 1, c),
                            (Shared, 1, c),
                            (Attn0, 0, c + 1),
                            (Mlp, 1, c),
                            (Attn1, 0, c + 1),
                        ] {
                            b.push(stage, mb, layer)?;
                        }
                    }
                    Phase::Prefill => {
                        if c == -1 {
                            b.push(Attn, 0, 0)?;
                            continue;
                        }
                        b.push(Attn, 1, c)?;
                        if c == 0 {
                            // Prologue: MLP(0) of the first layer after ATTN(1) of it.
                            b.push(Mlp, 0, 0)?;
                        }
                        for (stage, mb, layer) in [
                            (Shared, 0, c),
                            (Attn, 0, c + 1),
                            (Mlp, 1, c),
                            (Mlp, 0, c + 1),
                            (Shared, 1, c),
                        ] {
                            b.push(stage, mb, layer)?;
                        }
                    }
                }
            }
            b.push(Head, 0, n)?;
            b.push(Head, 1, n)?;
        }
        Schedule::SingleBatch | Schedule::SerialMicroBatches => {
            let mbs = schedule.micro_batches() as u8;
            for l in 0..n {
                for mb in 0..mbs {
                    let stages: &[StageKind] = match phase {
                        Phase::Decode => &[Attn0, Attn1, Shared, Mlp],
                        Phase::Prefill => &[Attn, Shared, Mlp],
                    };
                    for &s in stages {
                        b.push(s, mb, l)?;
                    }
                }
            }
            for mb in 0..mbs {
                b.push(Head, mb, n)?;
            }
        }
    }
    Ok(b.program)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(p: &Program) -> Vec<String> {
        p.ops
            .iter()
            .map(|o| format!("{}({},{})", o.stage.label(), o.mb, o.layer))
            .collect()
    }

    #[test]
    fn decode_overlap_follows_the_five_stage_pipeline() {
        let layers = [LayerKind::Moe(0), LayerKind::Moe(1)];
        let p = build(Phase::Decode, Schedule::TwoBatchOverlap, &layers).unwrap();
        let l = labels(&p);
        assert_eq!(
            &l[..10],
            &[
                "ATTN-0(0,0)",
                "ATTN-1(0,0)",
                "SHARED(0,0)",
                "ATTN-0(1,0)",
                "MLP(0,0)",
                "ATTN-1(1,0)",
                "SHARED(1,0)",
                "ATTN-0(0,1)",
                "MLP(1,0)",
                "ATTN-1(0,1)"
            ]
        );
        let kinds: Vec<_> = p.colls.iter().map(|c| (c.kind, c.mb, c.layer)).collect();
        use CollectiveKind::*;
        assert_eq!(
            &kinds[..4],
            &[
                (Dispatch, 0, 0),
                (Combine, 0, 0),
                (Dispatch, 1, 0),
                (Combine, 1, 0)
            ]
        );
        assert_eq!(p.colls.len(), 8);
    }

    #[test]
    fn prefill_overlap_alternates_like_deepseeks_figure() {
        let layers = [LayerKind::Moe(0), LayerKind::Moe(1), LayerKind::Moe(2)];
        let p = build(Phase::Prefill, Schedule::TwoBatchOverlap, &layers).unwrap();
        let l = labels(&p);
        assert_eq!(
            &l[..9],
            &[
                "ATTN(0,0)",
                "ATTN(1,0)",
                "MLP(0,0)",
                "SHARED(0,0)",
                "ATTN(0,1)",
                "MLP(1,0)",
                "MLP(0,1)",
                "SHARED(1,0)",
                "ATTN(1,1)"
            ]
        );
        // Steady state: COMBINE(0) DISPATCH(1) DISPATCH(0)' COMBINE(1).
        use CollectiveKind::*;
        let kinds: Vec<_> = p.colls.iter().map(|c| (c.kind, c.mb, c.layer)).collect();
        assert_eq!(
            &kinds[5..9],
            &[
                (Combine, 0, 1),
                (Dispatch, 1, 1),
                (Dispatch, 0, 2),
                (Combine, 1, 1)
            ]
        );
    }

    #[test]
    fn dense_layers_have_no_collectives() {
        let layers = [LayerKind::Dense, LayerKind::Dense, LayerKind::Moe(0)];
        for phase in [Phase::Decode, Phase::Prefill] {
            for s in [
                Schedule::SingleBatch,
                Schedule::SerialMicroBatches,
                Schedule::TwoBatchOverlap,
            ] {
                let p = build(phase, s, &layers).unwrap();
                assert_eq!(p.colls.len(), 2 * s.micro_batches(), "{phase:?} {s:?}");
                assert!(p.ops.iter().any(|o| o.stage == StageKind::DenseFfn));
            }
        }
    }

    #[test]
    fn serial_ops_wait_for_the_last_collective() {
        let p = build(
            Phase::Decode,
            Schedule::SerialMicroBatches,
            &[LayerKind::Moe(0)],
        )
        .unwrap();
        // ATTN-0 of micro-batch 1 waits for COMBINE of micro-batch 0.
        let op = p
            .ops
            .iter()
            .find(|o| o.stage == StageKind::Attn0 && o.mb == 1)
            .unwrap();
        assert!(op.waits.contains(&1));
    }
}
