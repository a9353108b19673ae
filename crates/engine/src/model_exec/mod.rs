//! [`ModelExecutor`]: runs a [`StepPlan`] on the real model (pdserve-model's [`DeepSeekV3`]).
//!
//! For each plan it
//! 1. forgets finished sequences and resets preempted ones (they recompute from position 0);
//! 2. writes the plan's `kv_loads` (KV computed by a prefill instance, handed over with
//!    [`ModelExecutor::stage_arrived_kv`]) into its paged [`CpuLatentStore`];
//! 3. runs the batch as one forward, or, with two-batch overlap on and
//!    [`ExecutorConfig::split_micro_batches`], one forward per micro-batch (as DeepSeek's TBO runs
//!    them): prefill chunks from their `start_pos`, decodes as `[input]` or `[input, draft]`, all
//!    through a [`LatentCache`](pdserve_model::LatentCache) view of the store whose lengths follow the
//!    plan's positions (so a rejected draft's row is overwritten, never read);
//! 4. samples each request with its own seeded [`Sampler`] (created on first sight): the token at
//!    output index `k` (the plan item's `num_output_tokens`, plus one after an accepted draft)
//!    uses draw `k` of the request's seed, so a seeded request gives the same tokens whatever the
//!    batch around it, after a preemption, and when a prefill instance sampled index 0 and a
//!    decode instance continues at index 1; while `k < min_tokens` the parameters'
//!    `suppressed_token_ids` (EOS and stop ids) are masked;
//! 5. verifies drafts ([`crate::spec`]): greedy drafts by sampling the target token and comparing
//!    (exact, and token-identical to decoding without MTP under a seed); sampled drafts by the
//!    standard rule `min(1, p(d)/q(d))` with residual resampling;
//! 6. runs the MTP module from the last accepted position's final hidden state and the newly
//!    sampled token to draft the next token (the MTP layer keeps its own latent cache slot; a
//!    prefill chunk's last hidden state waits for the next chunk's first token).
//!
//! Every request gets a DP attention rank on first sight ([`DpRanks`]: least-loaded, stable); the
//! step's [`StepRouting`] carries ranks, micro-batches, contexts and the real routing of every MoE
//! layer, which is what [`FabricStepClock`](crate::FabricStepClock) prices.
//!
//! Failures of one sequence (its arrived KV was never staged, its sampling parameters are invalid)
//! leave it out of the step with no output, which [`EngineState::apply`](crate::EngineState::apply)
//! turns into an `error` finish for that sequence only; a failure of the forward itself fails the
//! step ([`ExecError`]).

mod cache;
mod routing;
mod step;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use pdserve_ep::{EpGroup, EpRuntimeConfig};
use pdserve_fabric::ExpertPlacement as FabricPlacement;
use pdserve_model::rng::SplitMix64;
use pdserve_model::{
    Checkpoint, DeepSeekV3, LocalExperts, ModelError, MoeExperts, Sampler, SamplingParams,
};
use serde::{Deserialize, Serialize};

pub use routing::{RoutedRequest, StepRouting};

use crate::block_pool::BlockId;
use crate::config::SchedulerConfig;
use crate::dp::DpRanks;
use crate::executor::{Executor, StepOutputs};
use crate::latent_store::{CpuLatentStore, LatentRows, LatentShape, LatentStore, StoreError};
use crate::plan::StepPlan;
use crate::sequence::RequestId;

/// How the MTP module's proposal becomes a draft token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftMode {
    /// The MTP module's most likely token (verified by exact match against the target sample:
    /// same tokens as decoding without MTP, for greedy and seeded sampling alike).
    #[default]
    Greedy,
    /// A token drawn from the MTP distribution under the request's sampling parameters (verified
    /// with the standard rule; same distribution as decoding without MTP, different draws).
    Sample,
}

/// Executor settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorConfig {
    /// KV blocks backing the latent store: the scheduler's `num_kv_blocks`.
    pub num_kv_blocks: usize,
    /// Keep the MTP layer's latent cache and draft with the MTP module when a plan asks for drafts
    /// (the scheduler's `spec_tokens = 1`).
    pub mtp: bool,
    /// DP attention ranks: the GPUs of the EP group.
    pub dp_ranks: u32,
    /// Seed of the samplers of requests that bring none (mixed with the request id).
    pub seed: u64,
    /// How drafts are chosen.
    pub draft: DraftMode,
    /// With two-batch overlap on, run each micro-batch as its own forward (DeepSeek's TBO); off:
    /// one forward for the whole step. Tokens are the same either way.
    pub split_micro_batches: bool,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            num_kv_blocks: SchedulerConfig::default().num_kv_blocks,
            mtp: false,
            dp_ranks: 1,
            seed: 0,
            draft: DraftMode::Greedy,
            split_micro_batches: true,
        }
    }
}

impl ExecutorConfig {
    /// The settings matching a scheduler configuration (`num_kv_blocks`, `mtp` from
    /// `spec_tokens`) on `dp_ranks` ranks; the rest default.
    pub fn for_scheduler(scheduler: &SchedulerConfig, dp_ranks: u32) -> Self {
        Self {
            num_kv_blocks: scheduler.num_kv_blocks,
            mtp: scheduler.spec_tokens > 0,
            dp_ranks,
            ..Self::default()
        }
    }
}

/// Errors of the model executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The model failed (bad input reaching it, cache refusal, tensor error).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The latent store refused an access.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A setting is unusable; names the field.
    #[error("executor config: `{field}` {problem}")]
    Config {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// Arrived KV does not match the store's shape or the request.
    #[error("arrived KV of request {id}: {problem}")]
    ArrivedKv {
        /// The request.
        id: RequestId,
        /// What is wrong.
        problem: String,
    },
    /// The executor's per-request state disagrees with the plan (a bug, reported, never a panic).
    #[error("request {id}: {problem}")]
    Sequence {
        /// The request.
        id: RequestId,
        /// What is inconsistent.
        problem: String,
    },
    /// A plan asks for something this executor was not built for.
    #[error("step {step_id}: {problem}")]
    Plan {
        /// The step.
        step_id: u64,
        /// What is wrong.
        problem: String,
    },
}

impl From<candle_core::Error> for ExecError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

/// Routed-expert execution for the executor: the model's [`MoeExperts`] plus what an
/// expert-parallel runtime needs around the forwards. Implementations: [`LocalExperts`] (every
/// expert in this process) and the EP runtime's `EpGroup` (`D` ranks exchanging real hidden rows).
pub trait ExpertBackend: MoeExperts {
    /// Called before each forward with the DP rank of every token row, in the forward's flattened
    /// order (the EP runtime dispatches each row from its rank).
    fn begin_forward(&mut self, token_ranks: &[u32]) -> Result<(), ModelError>;

    /// Called once a step's forwards are done (the EP runtime folds the step into its load
    /// statistics and rebalances when EPLB's period has come).
    fn end_step(&mut self) -> Result<(), ModelError>;

    /// The placement of every MoE layer (main layers in order, then the MTP layer) in the fabric's
    /// form, when this backend decides where experts live; `None`: the clock's own placement.
    fn fabric_placements(&self) -> Result<Option<Vec<FabricPlacement>>, ModelError>;

    /// After [`ExpertBackend::end_step`]: the GPU that served each (token row, expert) pair of the
    /// step, one vector per MoE layer (main layers, then the MTP layer), rows in the order the
    /// forwards gave them, when this backend moved the rows; `None` (the default): the clock
    /// chooses replicas itself.
    fn served_gpus(&self) -> Result<Option<Vec<Vec<u32>>>, ModelError> {
        Ok(None)
    }
}

impl ExpertBackend for LocalExperts {
    /// Local experts hold every expert: no rows move, ranks play no part.
    fn begin_forward(&mut self, _token_ranks: &[u32]) -> Result<(), ModelError> {
        Ok(())
    }

    fn end_step(&mut self) -> Result<(), ModelError> {
        Ok(())
    }

    fn fabric_placements(&self) -> Result<Option<Vec<FabricPlacement>>, ModelError> {
        Ok(None)
    }
}

impl ExpertBackend for EpGroup {
    fn begin_forward(&mut self, token_ranks: &[u32]) -> Result<(), ModelError> {
        Ok(self.set_token_ranks(token_ranks)?)
    }

    fn end_step(&mut self) -> Result<(), ModelError> {
        self.finish_step()?;
        Ok(())
    }

    fn fabric_placements(&self) -> Result<Option<Vec<FabricPlacement>>, ModelError> {
        Ok(Some(EpGroup::fabric_placements(self)?))
    }

    fn served_gpus(&self) -> Result<Option<Vec<Vec<u32>>>, ModelError> {
        Ok(Some(self.last_step_served_ranks()))
    }
}

/// KV computed by a prefill instance for positions `0..num_tokens`, one [`LatentRows`] per layer
/// of the store (the main layers, then the MTP layer when the executor keeps it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArrivedKv {
    /// Positions covered.
    pub num_tokens: usize,
    /// Rows of each layer.
    pub layers: Vec<LatentRows>,
}

/// Counters of the executor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    /// Main-model forwards run.
    pub forwards_total: u64,
    /// Tokens through the main model.
    pub main_tokens_total: u64,
    /// MTP forwards run.
    pub mtp_forwards_total: u64,
    /// Tokens through the MTP module.
    pub mtp_tokens_total: u64,
    /// Drafts verified.
    pub drafts_verified_total: u64,
    /// Drafts accepted, per draft position (length 1: MTP depth 1).
    pub drafts_accepted_per_pos: Vec<u64>,
    /// Arrived KV loads written.
    pub kv_loads_total: u64,
    /// Sequences left out of a step (missing arrived KV, invalid sampling parameters).
    pub failed_seqs_total: u64,
}

/// Per-request state kept across steps.
#[derive(Debug)]
pub(crate) struct SeqState {
    pub(crate) sampler: Sampler,
    /// Draws for sampled drafts and their verification (independent of `sampler`).
    pub(crate) spec_rng: SplitMix64,
    pub(crate) rank: u32,
    /// Final hidden state of the last computed position whose MTP entry awaits the next token
    /// (a non-final prefill chunk's last position): `(position, hidden)`.
    pub(crate) mtp_pending: Option<(usize, Vec<f32>)>,
    /// The distribution the pending draft was drawn from ([`DraftMode::Sample`]).
    pub(crate) draft_q: Option<Vec<f64>>,
}

/// Runs plans on a [`DeepSeekV3`] with routed experts `X`; see the module docs.
#[derive(Debug)]
pub struct ModelExecutor<X = LocalExperts> {
    pub(crate) model: Arc<DeepSeekV3>,
    pub(crate) experts: X,
    pub(crate) store: CpuLatentStore,
    pub(crate) config: ExecutorConfig,
    pub(crate) seqs: HashMap<RequestId, SeqState>,
    pub(crate) ranks: DpRanks,
    staged: HashMap<RequestId, ArrivedKv>,
    pub(crate) stats: ExecStats,
}

impl ModelExecutor<LocalExperts> {
    /// Loads the checkpoint in `dir` on the CPU with every routed expert local.
    pub fn load(dir: &Path, config: ExecutorConfig) -> Result<Self, ExecError> {
        let (model, experts) = DeepSeekV3::load(dir, &Device::Cpu)?;
        Self::new(Arc::new(model), experts, config)
    }
}

impl ModelExecutor<EpGroup> {
    /// Loads the checkpoint in `dir` on the CPU with its routed experts in an expert-parallel
    /// group (`ep.placement.num_ranks` ranks, which must equal `config.dp_ranks`).
    pub fn load_ep(
        dir: &Path,
        config: ExecutorConfig,
        ep: EpRuntimeConfig,
    ) -> Result<Self, ExecError> {
        if ep.ep_size() != config.dp_ranks as usize {
            return Err(ExecError::Config {
                field: "dp_ranks",
                problem: format!(
                    "is {} but the EP runtime has placement.num_ranks = {}: every GPU is one DP \
                     rank and one EP rank",
                    config.dp_ranks,
                    ep.ep_size()
                ),
            });
        }
        let ckpt = Checkpoint::open(dir)?;
        let model = DeepSeekV3::from_checkpoint(&ckpt, &Device::Cpu)?;
        let group = EpGroup::load(&ckpt, ep, &Device::Cpu).map_err(ModelError::from)?;
        Self::new(Arc::new(model), group, config)
    }
}

impl<X: ExpertBackend> ModelExecutor<X> {
    /// An executor over `model` with routed experts `experts`; allocates the latent store for
    /// `config.num_kv_blocks` blocks.
    pub fn new(
        model: Arc<DeepSeekV3>,
        experts: X,
        config: ExecutorConfig,
    ) -> Result<Self, ExecError> {
        if config.dp_ranks == 0 {
            return Err(ExecError::Config {
                field: "dp_ranks",
                problem: "must be at least 1".into(),
            });
        }
        if config.mtp && !model.has_mtp() {
            return Err(ExecError::Config {
                field: "mtp",
                problem: "the checkpoint has no MTP module (num_nextn_predict_layers = 0)".into(),
            });
        }
        let c = model.config();
        let shape = LatentShape {
            num_layers: c.num_hidden_layers + usize::from(config.mtp),
            kv_lora_rank: c.kv_lora_rank,
            rope_dim: c.qk_rope_head_dim,
        };
        let store = CpuLatentStore::new(shape, config.num_kv_blocks)?;
        Ok(Self {
            ranks: DpRanks::new(config.dp_ranks),
            stats: ExecStats {
                drafts_accepted_per_pos: vec![0; usize::from(config.mtp)],
                ..ExecStats::default()
            },
            model,
            experts,
            store,
            config,
            seqs: HashMap::new(),
            staged: HashMap::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<DeepSeekV3> {
        &self.model
    }

    /// The routed experts.
    pub fn experts(&self) -> &X {
        &self.experts
    }

    /// The settings.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &ExecStats {
        &self.stats
    }

    /// The DP rank assignment.
    pub fn ranks(&self) -> &DpRanks {
        &self.ranks
    }

    /// The latent store's per-token shape.
    pub fn latent_shape(&self) -> LatentShape {
        self.store.shape()
    }

    /// Hands over KV that a prefill instance computed for `id`; the plan that lists `id` in its
    /// `kv_loads` writes it into the request's blocks. Checked against the store's shape now.
    pub fn stage_arrived_kv(&mut self, id: RequestId, kv: ArrivedKv) -> Result<(), ExecError> {
        let shape = self.store.shape();
        let bad = |problem: String| Err(ExecError::ArrivedKv { id, problem });
        if kv.layers.len() != shape.num_layers {
            return bad(format!(
                "has {} layers, the store caches {} (main layers{})",
                kv.layers.len(),
                shape.num_layers,
                if self.config.mtp {
                    " and the MTP layer"
                } else {
                    ""
                }
            ));
        }
        for (layer, rows) in kv.layers.iter().enumerate() {
            let ok = rows.len == kv.num_tokens
                && rows.c_kv.len() == kv.num_tokens * shape.kv_lora_rank
                && rows.k_rope.len() == kv.num_tokens * shape.rope_dim;
            if !ok {
                return bad(format!(
                    "layer {layer} holds {} rows ({} c_kv and {} k_rope floats) for {} tokens of \
                     widths {} and {}",
                    rows.len,
                    rows.c_kv.len(),
                    rows.k_rope.len(),
                    kv.num_tokens,
                    shape.kv_lora_rank,
                    shape.rope_dim
                ));
            }
        }
        self.staged.insert(id, kv);
        Ok(())
    }

    /// The KV of positions `0..num_tokens` in the blocks of `table` (every layer of the store), to
    /// send to a decode instance.
    pub fn export_kv(&self, table: &[BlockId], num_tokens: usize) -> Result<ArrivedKv, ExecError> {
        let layers = (0..self.store.shape().num_layers)
            .map(|layer| self.store.gather(table, layer, num_tokens))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ArrivedKv { num_tokens, layers })
    }

    /// Drops finished requests' state and resets preempted ones.
    fn forget<P>(&mut self, plan: &StepPlan<P>) {
        for (id, _) in &plan.finished {
            self.seqs.remove(id);
            self.staged.remove(id);
            self.ranks.release(*id);
        }
        for id in &plan.preempted {
            if let Some(s) = self.seqs.get_mut(id) {
                s.mtp_pending = None;
                s.draft_q = None;
            }
        }
    }

    /// Writes the plan's arrived KV; requests whose KV was never staged go into `failed`.
    fn load_kv<P>(
        &mut self,
        plan: &StepPlan<P>,
        failed: &mut HashSet<RequestId>,
    ) -> Result<(), ExecError> {
        for load in &plan.kv_loads {
            let Some(kv) = self.staged.remove(&load.id) else {
                failed.insert(load.id);
                continue;
            };
            if kv.num_tokens != load.num_tokens {
                failed.insert(load.id);
                continue;
            }
            for (layer, rows) in kv.layers.iter().enumerate() {
                self.store
                    .write_rows(&load.block_table, layer, 0, &rows.c_kv, &rows.k_rope)?;
            }
            self.stats.kv_loads_total += 1;
        }
        Ok(())
    }

    /// The state of `id`, created on first sight (sampler, rank); `None` for invalid parameters.
    pub(crate) fn ensure_seq(
        &mut self,
        id: RequestId,
        params: &SamplingParams,
    ) -> Option<&mut SeqState> {
        if !self.seqs.contains_key(&id) {
            let fallback =
                SplitMix64::new(self.config.seed ^ id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .next_u64();
            let sampler = Sampler::new(params.clone(), fallback).ok()?;
            let base = params.seed.unwrap_or(fallback);
            let rank = self.ranks.assign(id);
            self.seqs.insert(
                id,
                SeqState {
                    sampler,
                    spec_rng: SplitMix64::for_stream(base, "pdserve-draft"),
                    rank,
                    mtp_pending: None,
                    draft_q: None,
                },
            );
        }
        self.seqs.get_mut(&id)
    }
}

impl<X: ExpertBackend> Executor<SamplingParams> for ModelExecutor<X> {
    type Routing = StepRouting;
    type Error = ExecError;

    fn execute(
        &mut self,
        plan: &StepPlan<SamplingParams>,
    ) -> Result<StepOutputs<StepRouting>, ExecError> {
        self.forget(plan);
        if plan.spec_tokens > 0 && !self.config.mtp {
            return Err(ExecError::Plan {
                step_id: plan.step_id,
                problem: format!(
                    "asks for {} draft token(s) but the executor was built with `mtp = false`",
                    plan.spec_tokens
                ),
            });
        }
        let mut failed = HashSet::new();
        self.load_kv(plan, &mut failed)?;
        self.run_plan(plan, failed)
    }
}
