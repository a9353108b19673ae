//! The real model and the simulated fabric behind a prefill or decode service.
//!
//! [`ModelBackend`] adapts the engine's [`ModelExecutor`] (sampling parameters of the model crate,
//! KV handed over with `stage_arrived_kv` / `export_kv`) to the worker's seams ([`SeqParams`],
//! [`KvAccess`]). [`FabricClock`] adds
//! the fabric's KV-transfer pricing to the engine's [`FabricStepClock`].
//!
//! `KvAccess` maps one to one onto the executor's hand-over (`stage_arrived_kv`, `export_kv`),
//! converting the worker's [`KvRows`] to and from the executor's per-layer rows; nothing is copied
//! besides that conversion.
//!
//! Limits, stated where results are reported (docs/deploy.md):
//! - `min_tokens` is not enforced by the model executor (it cannot mask EOS while sampling); the
//!   router still holds stop strings back until `min_tokens`.

use pdserve_engine::{
    ArrivedKv, BlockId, DecodeItem, ExecError, Executor, FabricStepClock, LatentShape,
    ModelExecutor, PrefillChunk, RequestId, StepClock, StepOutputs, StepPlan, StepRouting,
};
use pdserve_model::SamplingParams as ModelSampling;
use pdserve_worker::{KvAccess, KvError, KvRows, KvTransferClock, SeqParams};

/// The model executor behind a service; see the module docs.
#[derive(Debug)]
pub struct ModelBackend {
    exec: ModelExecutor,
}

impl ModelBackend {
    /// Wraps `exec`.
    pub fn new(exec: ModelExecutor) -> Self {
        Self { exec }
    }
}

/// The model crate's sampling parameters for a service's.
fn model_sampling(p: &SeqParams) -> ModelSampling {
    let s = &p.sampling;
    ModelSampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k.map_or(0, |k| k as usize),
        seed: s.seed,
        logprobs: s.logprobs.map(usize::from),
    }
}

fn convert_plan(plan: &StepPlan<SeqParams>) -> StepPlan<ModelSampling> {
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
                params: model_sampling(&c.params),
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
                params: model_sampling(&d.params),
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
        self.exec.execute(&convert_plan(plan))
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

/// The fabric's step clock plus its KV-transfer price (one NIC, same leaf).
#[derive(Debug)]
pub struct FabricClock {
    /// Prices steps.
    pub step: FabricStepClock,
    /// Whether the transferred KV includes the MTP layer.
    pub mtp: bool,
}

impl<P> StepClock<P, StepRouting> for FabricClock {
    fn step_duration_ns(&mut self, plan: &StepPlan<P>, routing: &StepRouting) -> u64 {
        self.step.step_duration_ns(plan, routing)
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
        let m = model_sampling(&p);
        assert_eq!(m.top_k, 0);
        assert_eq!(m.temperature, 0.0);
        assert_eq!(m.top_p, 0.5);
        assert_eq!(m.seed, Some(7));
        assert_eq!(m.logprobs, Some(3));
    }
}
