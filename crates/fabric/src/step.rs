//! Step simulation: a batch, its routing and a placement in; a timeline and its duration out.
//!
//! [`Fabric::simulate_step`] builds the stage program of the phase and schedule
//! ([`crate::schedule`]), prices every op on every GPU with the cost model, and runs the program:
//! for each collective in comm-stream order, every GPU runs its compute stream up to the op that
//! triggers the collective, issues it when that op ends and its comm stream is idle, and the
//! fabric ([`crate::network`]) says when each GPU has received it. Ops that wait for a collective
//! start no earlier than its arrival on their GPU.
//!
//! Routing reuse: MoE layer `i` of the modeled model uses `routing[i % routing.len()]`; the MTP
//! layer uses `mtp_routing` when given, else the next layer in the same cycle. Traffic plans are
//! built once per distinct routing layer and micro-batch — ahead, on the fabric's plan threads
//! ([`Fabric::with_plan_threads`]), or when first needed with one thread — and dropped after
//! their last collective (the executor is in [`crate::exec`], the plan workers in
//! [`crate::ahead`]). The result is bit-identical for any thread count.
//!
//! Invariants: each GPU's compute ops never overlap and never go back in time; a step's duration
//! is the last op's end; every routed copy is either local or carried by a flow.

use serde::Serialize;

use crate::batch::{Phase, StepBatch};
use crate::error::FabricError;
use crate::exec::Executor;
use crate::fabric::Fabric;
use crate::network::CollectiveKind;
use crate::placement::ExpertPlacement;
use crate::routing::LayerRouting;
use crate::schedule::{Schedule, StageKind};
use crate::trace::Trace;

/// Everything one step needs.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Prefill or decode.
    pub phase: Phase,
    /// Requests per GPU.
    pub batch: &'a StepBatch,
    /// Routing of the real MoE layers, reused cyclically over the modeled MoE layers.
    pub routing: &'a [LayerRouting],
    /// Routing of the MTP layer, when the real model has one.
    pub mtp_routing: Option<&'a LayerRouting>,
    /// Expert → GPU(s): one placement for every layer, or one per routing layer (then
    /// `routing.len()` entries, plus one for `mtp_routing` when given).
    pub placements: &'a [ExpertPlacement],
    /// TBO on or off.
    pub schedule: Schedule,
    /// Run the MTP module after the main model (decode with speculative drafting).
    pub mtp: bool,
    /// Keep the timeline for [`Trace::to_chrome_json`].
    pub record_trace: bool,
}

/// Timing of one collective over the group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CollectiveTiming {
    /// Dispatch or combine.
    pub kind: CollectiveKind,
    /// Modeled layer.
    pub layer: u32,
    /// Micro-batch.
    pub micro_batch: u8,
    /// First issue, µs.
    pub start_us: f64,
    /// Last arrival, µs.
    pub end_us: f64,
    /// Mean over GPUs of (received − issued), µs.
    pub mean_latency_us: f64,
    /// Bytes over NICs.
    pub nic_bytes: f64,
    /// Bytes over NVLink.
    pub nvlink_bytes: f64,
}

/// The result of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    /// Simulated duration, µs.
    pub duration_us: f64,
    /// When each modeled layer (the MTP layer last) has finished on every GPU, µs.
    pub layer_end_us: Vec<f64>,
    /// Mean over GPUs of the time each stage kept the compute stream busy, µs.
    pub stage_busy_us: Vec<(StageKind, f64)>,
    /// Every collective in comm-stream order.
    pub collectives: Vec<CollectiveTiming>,
    /// Mean over GPUs of compute-stream busy time, µs.
    pub compute_busy_us: f64,
    /// Tokens in the step.
    pub tokens: u64,
    /// The timeline, when recorded.
    #[serde(skip)]
    pub trace: Option<Trace>,
}

impl StepOutcome {
    /// Mean duration of one modeled layer, µs.
    pub fn mean_layer_us(&self) -> f64 {
        if self.layer_end_us.is_empty() {
            0.0
        } else {
            self.duration_us / self.layer_end_us.len() as f64
        }
    }

    /// Mean over collectives of `kind` of their span (last arrival − first issue), µs.
    pub fn mean_collective_us(&self, kind: CollectiveKind) -> f64 {
        let spans: Vec<f64> = self
            .collectives
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.end_us - c.start_us)
            .collect();
        if spans.is_empty() {
            0.0
        } else {
            spans.iter().sum::<f64>() / spans.len() as f64
        }
    }

    /// Bytes over NICs in the step.
    pub fn nic_bytes(&self) -> f64 {
        self.collectives.iter().map(|c| c.nic_bytes).sum()
    }

    /// Bytes over NVLink in the step.
    pub fn nvlink_bytes(&self) -> f64 {
        self.collectives.iter().map(|c| c.nvlink_bytes).sum()
    }
}

impl Fabric {
    /// Simulates one step; see the module doc.
    pub fn simulate_step(&self, input: &StepInput<'_>) -> Result<StepOutcome, FabricError> {
        let n = self.topology.num_gpus() as usize;
        input.batch.validate(n as u32)?;
        if self.shape.is_moe() {
            if input.routing.is_empty() {
                return Err(FabricError::invalid(
                    "routing",
                    "layers",
                    "is empty but the modeled shape has MoE layers",
                ));
            }
            let want = input.routing.len() + usize::from(input.mtp_routing.is_some());
            if input.placements.len() != 1 && input.placements.len() != want {
                return Err(FabricError::invalid(
                    "placement",
                    "placements",
                    format!(
                        "has {} entries: give 1, or {want} (one per routing layer)",
                        input.placements.len()
                    ),
                ));
            }
            for p in input.placements {
                self.check_placement(p, input.mtp)?;
            }
            let tokens = input.batch.tokens_per_rank();
            let layers = input.routing.iter().map(Some).chain([input.mtp_routing]);
            for (r, routing) in layers.enumerate() {
                let Some(routing) = routing else { continue };
                let origin = if r < input.routing.len() {
                    format!("routing[{r}]")
                } else {
                    "mtp_routing".into()
                };
                if routing.num_ranks() != n {
                    return Err(FabricError::invalid(
                        origin,
                        "ranks",
                        format!(
                            "covers {} ranks for an EP group of {n} GPUs",
                            routing.num_ranks()
                        ),
                    ));
                }
                if let Some(rank) = (0..n).find(|&g| routing.tokens_of(g) != tokens[g] as usize) {
                    return Err(FabricError::invalid(
                        origin,
                        format!("tokens_per_rank[{rank}]"),
                        format!(
                            "has {} tokens, the batch has {}",
                            routing.tokens_of(rank),
                            tokens[rank]
                        ),
                    ));
                }
            }
        }
        if input.mtp_routing.is_some() && !input.mtp {
            return Err(FabricError::invalid(
                "step",
                "mtp_routing",
                "is given but mtp is off",
            ));
        }
        if input.mtp && self.shape.num_nextn_predict_layers == 0 {
            return Err(FabricError::invalid(
                "step",
                "mtp",
                "the modeled shape has no MTP module",
            ));
        }
        Executor::new(self, input)?.run()
    }
}
