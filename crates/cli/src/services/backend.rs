//! The real model and the simulated fabric behind a prefill or decode service.
//!
//! [`ModelBackend`] adapts the engine's [`ModelExecutor`] (sampling parameters of the model crate,
//! KV handed over with `stage_arrived_kv` / `export_kv`) to the worker's seams ([`SeqParams`],
//! [`KvAccess`]). Its executor runs the instance's [`ServiceExperts`], local or on the EP runtime:
//! one type for both, so the plan conversion and the KV hand-over are written once. [`FabricClock`]
//! adds the fabric's KV-transfer pricing to the engine's [`FabricStepClock`], which prices each
//! step with the placement and served GPUs the step's [`StepRouting`] carries (the EP runtime's)
//! or its own; [`fabric_report`]'s balancedness counts the GPUs that really served when known.
//!
//! `KvAccess` maps one to one onto the executor's hand-over (`stage_arrived_kv`, `export_kv`),
//! converting the worker's [`KvRows`] to and from the executor's per-layer rows; nothing is copied
//! besides that conversion.
//!
//! Sampling: [`SeqParams`] become the model crate's parameters with the seed the service set, and
//! `min_tokens` with the ids it masks: the request's `stop_token_ids` plus the model's EOS ids
//! unless `ignore_eos` (EOS then stops nothing, so it is not masked either, as in vLLM). The
//! executor masks them while sampling output index `k < min_tokens` and samples index `k` with
//! draw `k` of the seed, so prefill (index 0) and decode (index 1 on) continue one stream.

use pdserve_engine::{
    ArrivedKv, BlockId, ClockError, DecodeItem, ExecError, Executor, FabricStepClock, LatentShape,
    ModelExecutor, PrefillChunk, RequestId, StepClock, StepOutputs, StepPlan, StepRouting,
    StepTiming,
};
use pdserve_fabric::{CollectiveKind, ExpertPlacement, Mode, Schedule, StepOutcome};
use pdserve_model::SamplingParams as ModelSampling;
use pdserve_worker::{FabricStepReport, KvAccess, KvError, KvRows, KvTransferClock, SeqParams};

use super::experts::ServiceExperts;

/// The model executor behind a service; see the module docs.
#[derive(Debug)]
pub struct ModelBackend {
    exec: ModelExecutor<ServiceExperts>,
    eos_token_ids: Vec<u32>,
}

impl ModelBackend {
    /// Wraps `exec`; `eos_token_ids` are the model's end-of-sequence ids (masked below
    /// `min_tokens` unless a request sets `ignore_eos`).
    pub fn new(exec: ModelExecutor<ServiceExperts>, eos_token_ids: Vec<u32>) -> Self {
        Self {
            exec,
            eos_token_ids,
        }
    }

    /// The executor (its experts say whether the EP runtime runs them).
    pub fn executor(&self) -> &ModelExecutor<ServiceExperts> {
        &self.exec
    }
}

/// The model crate's sampling parameters for a service's; `eos` are the model's EOS ids.
fn model_sampling(p: &SeqParams, eos: &[u32]) -> ModelSampling {
    let s = &p.sampling;
    let stop = &p.stop;
    let suppressed_token_ids = if stop.min_tokens == 0 {
        Vec::new()
    } else {
        let mut ids = stop.stop_token_ids.clone();
        if !stop.ignore_eos {
            ids.extend_from_slice(eos);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    ModelSampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k.map_or(0, |k| k as usize),
        seed: s.seed,
        logprobs: s.logprobs.map(usize::from),
        min_tokens: stop.min_tokens as usize,
        suppressed_token_ids,
    }
}

fn convert_plan(plan: &StepPlan<SeqParams>, eos: &[u32]) -> StepPlan<ModelSampling> {
    StepPlan {
        step_id: plan.step_id,
        now_ns: plan.now_ns,
        spec_tokens: plan.spec_tokens,
        kv_loads: plan.kv_loads.clone(),
        prefills: plan
            .prefills
            .iter()
            .map(|c| PrefillChunk {
                id: c.id,
                tokens: c.tokens.clone(),
                start_pos: c.start_pos,
                samples: c.samples,
                num_output_tokens: c.num_output_tokens,
                block_table: c.block_table.clone(),
                params: model_sampling(&c.params, eos),
                micro_batch: c.micro_batch,
            })
            .collect(),
        decodes: plan
            .decodes
            .iter()
            .map(|d| DecodeItem {
                id: d.id,
                input_token: d.input_token,
                draft_token: d.draft_token,
                position: d.position,
                num_output_tokens: d.num_output_tokens,
                block_table: d.block_table.clone(),
                params: model_sampling(&d.params, eos),
                micro_batch: d.micro_batch,
            })
            .collect(),
        preempted: plan.preempted.clone(),
        finished: plan.finished.clone(),
        num_batched_tokens: plan.num_batched_tokens,
        micro_batch_work: plan.micro_batch_work,
    }
}

impl Executor<SeqParams> for ModelBackend {
    type Routing = StepRouting;
    type Error = ExecError;

    fn execute(
        &mut self,
        plan: &StepPlan<SeqParams>,
    ) -> Result<StepOutputs<StepRouting>, ExecError> {
        self.exec.execute(&convert_plan(plan, &self.eos_token_ids))
    }
}

fn kv_error(e: &ExecError) -> KvError {
    KvError::Backend(e.to_string())
}

impl KvAccess for ModelBackend {
    fn latent_shape(&self) -> LatentShape {
        self.exec.latent_shape()
    }

    fn stage_arrived_kv(&mut self, id: RequestId, kv: KvRows) -> Result<(), KvError> {
        let arrived = ArrivedKv {
            num_tokens: kv.tokens,
            layers: kv.to_layers(),
        };
        self.exec
            .stage_arrived_kv(id, arrived)
            .map_err(|e| kv_error(&e))
    }

    fn export_kv(&mut self, table: &[BlockId], tokens: usize) -> Result<KvRows, KvError> {
        let kv = self
            .exec
            .export_kv(table, tokens)
            .map_err(|e| kv_error(&e))?;
        KvRows::from_layers(self.exec.latent_shape(), kv.num_tokens, &kv.layers)
    }
}

/// The fabric's step clock plus its KV-transfer price (one NIC, same leaf), and the report of
/// each priced step ([`FabricStepReport`], see [`fabric_report`]).
#[derive(Debug)]
pub struct FabricClock {
    /// Prices steps.
    pub step: FabricStepClock,
    /// Whether the transferred KV includes the MTP layer.
    pub mtp: bool,
    report: Option<FabricStepReport>,
}

impl FabricClock {
    /// A clock over `step`; `mtp`: the transferred KV includes the MTP layer.
    pub fn new(step: FabricStepClock, mtp: bool) -> Self {
        Self {
            step,
            mtp,
            report: None,
        }
    }
}

impl<P> StepClock<P, StepRouting> for FabricClock {
    type Error = ClockError;

    fn step_duration_ns(
        &mut self,
        plan: &StepPlan<P>,
        routing: &StepRouting,
    ) -> Result<u64, ClockError> {
        self.report = None;
        let ns = self.step.step_duration_ns(plan, routing)?;
        self.report = self
            .step
            .last_timing()
            .filter(|t| !t.outcome.collectives.is_empty() || routing.num_rows > 0)
            .map(|t| fabric_report(&self.step, t, routing));
        Ok(ns)
    }
}

impl KvTransferClock for FabricClock {
    fn kv_transfer_ns(&mut self, tokens: usize) -> u64 {
        let t = self
            .step
            .fabric()
            .kv_transfer(tokens as u64, self.mtp, false);
        (t.duration_us * 1e3).round().max(0.0) as u64
    }

    fn take_step_report(&mut self) -> Option<FabricStepReport> {
        self.report.take()
    }
}

/// The report of a step `clock` priced as `timing` from `routing` (definitions in
/// docs/metrics.md, `pdserve_fabric_*` and `pdserve_ep_*`).
pub fn fabric_report(
    clock: &FabricStepClock,
    timing: &StepTiming,
    routing: &StepRouting,
) -> FabricStepReport {
    let o = &timing.outcome;
    let fabric = clock.fabric();
    let profile = fabric.profile();
    let (nvlink_bw, ib_bw) = match fabric.mode() {
        Mode::Analysis => (
            profile.scale_up.unidirectional_bytes_per_s,
            profile.scale_out.nic_bytes_per_s,
        ),
        Mode::Detailed => (
            profile.scale_up.effective_bytes_per_s,
            profile.scale_out.effective_bytes_per_s,
        ),
    };
    let gpus = f64::from(clock.config().ep_size.max(1));
    let nvlink_bytes: f64 = o.collectives.iter().map(|c| c.nvlink_bytes).sum();
    let ib_bytes: f64 = o.collectives.iter().map(|c| c.nic_bytes).sum();
    let busy = |bytes: f64, bw: f64| if bw > 0.0 { bytes / (gpus * bw) } else { 0.0 };
    let mean_span_s = |kind: CollectiveKind| {
        o.collectives
            .iter()
            .any(|c| c.kind == kind)
            .then(|| o.mean_collective_us(kind) * 1e-6)
    };
    let tbo_overlap_ratio = (timing.schedule == Schedule::TwoBatchOverlap)
        .then(|| overlap_ratio(o))
        .flatten();
    let mut expert_tokens: Vec<u64> = Vec::new();
    for layer in routing.layers.iter().chain(&routing.mtp) {
        for &id in &layer.routing.ids {
            let id = id as usize;
            if expert_tokens.len() <= id {
                expert_tokens.resize(id + 1, 0);
            }
            expert_tokens[id] += 1;
        }
    }
    let balanced: Vec<f64> = routing
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, layer)| {
            let placement = routing
                .placements
                .as_ref()
                .and_then(|p| p.get(i))
                .unwrap_or(clock.placement());
            match routing.served_gpus.as_ref().and_then(|s| s.get(i)) {
                Some(served) if served.len() == layer.routing.ids.len() => {
                    served_balancedness(served, placement.num_gpus())
                }
                _ => balancedness(&layer.routing.ids, placement),
            }
        })
        .collect();
    FabricStepReport {
        nvlink_bytes,
        ib_bytes,
        nvlink_busy_s: busy(nvlink_bytes, nvlink_bw),
        ib_busy_s: busy(ib_bytes, ib_bw),
        dispatch_s: mean_span_s(CollectiveKind::Dispatch),
        combine_s: mean_span_s(CollectiveKind::Combine),
        tbo_overlap_ratio,
        expert_tokens,
        balancedness: (!balanced.is_empty())
            .then(|| balanced.iter().sum::<f64>() / balanced.len() as f64),
    }
}

/// `(compute + comm − duration) / comm` clamped to `0..=1`, comm being the union of the
/// collectives' spans; `None` without communication.
fn overlap_ratio(o: &StepOutcome) -> Option<f64> {
    let mut spans: Vec<(f64, f64)> = o
        .collectives
        .iter()
        .map(|c| (c.start_us, c.end_us.max(c.start_us)))
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut comm_us = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (start, end) in spans {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                comm_us += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = current {
        comm_us += e - s;
    }
    (comm_us > 0.0)
        .then(|| ((o.compute_busy_us + comm_us - o.duration_us) / comm_us).clamp(0.0, 1.0))
}

/// Mean over `num_gpus` GPUs of the token-expert assignments each served (the EP runtime's
/// recorded replica choices), over the max; `None` when nothing was served.
fn served_balancedness(served: &[u32], num_gpus: u32) -> Option<f64> {
    let mut load = vec![0u64; num_gpus as usize];
    for &g in served {
        if let Some(l) = load.get_mut(g as usize) {
            *l += 1;
        }
    }
    let max = load.iter().copied().max().unwrap_or(0);
    (max > 0).then(|| load.iter().sum::<u64>() as f64 / load.len() as f64 / max as f64)
}

/// Mean over GPUs of the token-expert assignments each computes, over the max (a replicated
/// expert's share split evenly over its copies); `None` when nothing is routed to a known expert.
fn balancedness(ids: &[u32], placement: &ExpertPlacement) -> Option<f64> {
    let mut load = vec![0.0f64; placement.num_gpus() as usize];
    for &id in ids {
        let gpus = placement.gpus_of(id as usize);
        let share = 1.0 / gpus.len().max(1) as f64;
        for &g in gpus {
            if let Some(l) = load.get_mut(g as usize) {
                *l += share;
            }
        }
    }
    let max = load.iter().copied().fold(0.0, f64::max);
    (max > 0.0).then(|| load.iter().sum::<f64>() / load.len() as f64 / max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_protocol::params::{SamplingParams, StopParams};

    #[test]
    fn sampling_parameters_map_off_values_to_the_model_crate_convention() {
        let p = SeqParams {
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 0.5,
                top_k: None,
                seed: Some(7),
                logprobs: Some(3),
            },
            stop: StopParams {
                max_tokens: 4,
                stop_token_ids: vec![],
                ignore_eos: false,
                min_tokens: 0,
            },
        };
        let m = model_sampling(&p, &[1]);
        assert_eq!(m.top_k, 0);
        assert_eq!(m.temperature, 0.0);
        assert_eq!(m.top_p, 0.5);
        assert_eq!(m.seed, Some(7));
        assert_eq!(m.logprobs, Some(3));
        assert_eq!(m.min_tokens, 0);
        assert!(m.suppressed_token_ids.is_empty());
    }

    fn collective(
        kind: CollectiveKind,
        start_us: f64,
        end_us: f64,
    ) -> pdserve_fabric::CollectiveTiming {
        pdserve_fabric::CollectiveTiming {
            kind,
            layer: 0,
            micro_batch: 0,
            start_us,
            end_us,
            mean_latency_us: end_us - start_us,
            nic_bytes: 10.0,
            nvlink_bytes: 100.0,
        }
    }

    #[test]
    fn overlap_ratio_is_the_share_of_the_comm_union_hidden_under_compute() {
        // Comm spans [0,10] ∪ [5,15] ∪ [20,30] = 25 µs; compute 30 µs; step 40 µs:
        // serialized would take 55 µs, so 15 of the 25 µs of comm were hidden.
        let outcome = StepOutcome {
            duration_us: 40.0,
            layer_end_us: vec![40.0],
            stage_busy_us: vec![],
            collectives: vec![
                collective(CollectiveKind::Dispatch, 0.0, 10.0),
                collective(CollectiveKind::Combine, 5.0, 15.0),
                collective(CollectiveKind::Dispatch, 20.0, 30.0),
            ],
            compute_busy_us: 30.0,
            tokens: 8,
            trace: None,
        };
        assert_eq!(overlap_ratio(&outcome), Some(15.0 / 25.0));
        let serial = StepOutcome {
            duration_us: 80.0,
            ..outcome.clone()
        };
        assert_eq!(overlap_ratio(&serial), Some(0.0), "clamped at 0");
        let no_comm = StepOutcome {
            collectives: vec![],
            ..outcome
        };
        assert_eq!(overlap_ratio(&no_comm), None);
    }

    #[test]
    fn balancedness_is_mean_over_max_gpu_load_with_replicas_sharing() {
        // 4 experts on 2 GPUs: experts 0,1 on GPU 0, experts 2,3 on GPU 1.
        let placement = ExpertPlacement::contiguous(4, 2).unwrap();
        assert_eq!(balancedness(&[0, 2, 1, 3], &placement), Some(1.0));
        // GPU 0 gets 3, GPU 1 gets 1: mean 2 over max 3.
        assert_eq!(balancedness(&[0, 1, 0, 3], &placement), Some(2.0 / 3.0));
        assert_eq!(balancedness(&[], &placement), None);
    }

    #[test]
    fn served_balancedness_counts_the_gpus_that_really_served() {
        // Expert 0 replicated on GPUs 0 and 1: the runtime sent both pairs to GPU 1.
        assert_eq!(served_balancedness(&[1, 1, 2, 3], 4), Some(1.0 / 2.0));
        assert_eq!(served_balancedness(&[0, 1, 2, 3], 4), Some(1.0));
        assert_eq!(served_balancedness(&[], 4), None);
    }

    #[test]
    fn min_tokens_masks_stop_ids_and_eos_unless_eos_is_ignored() {
        let mut p = SeqParams {
            sampling: SamplingParams::default(),
            stop: StopParams {
                max_tokens: 8,
                stop_token_ids: vec![9, 4],
                ignore_eos: false,
                min_tokens: 3,
            },
        };
        let m = model_sampling(&p, &[1, 4]);
        assert_eq!(m.min_tokens, 3);
        assert_eq!(m.suppressed_token_ids, vec![1, 4, 9]);
        p.stop.ignore_eos = true;
        assert_eq!(model_sampling(&p, &[1]).suppressed_token_ids, vec![4, 9]);
    }
}
