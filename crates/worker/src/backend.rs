//! The seams where a model and a fabric plug into a service, and their stand-ins.
//!
//! A service runs an engine whose compute side is an [`EngineParts`]: an executor (the engine's
//! [`Executor`] over [`SeqParams`], plus [`KvAccess`] to stage arrived KV and export computed KV)
//! and a clock (the engine's [`StepClock`], plus [`KvTransferClock`] to price a KV transfer).
//! Both run on the engine's dedicated compute thread, never on the async runtime.
//!
//! Stand-ins: [`ScriptedBackend`] (the engine's [`ScriptedExecutor`] writing deterministic latent
//! rows, see [`ScriptedBackend::latent_row`]) and [`LinearFabricClock`].
//!
//! Invariants kept by the services: every `KvAccess` call happens on the compute thread, in order
//! with the steps (arrived KV is staged before any plan that lists it; a finished prefill's rows
//! are exported while its blocks are retained, so no later step overwrites them).

use std::collections::{HashMap, HashSet};

use pdserve_engine::{
    BlockId, CpuLatentStore, Executor, LatentShape, LatentStore, LinearStepClock, RequestId,
    ScriptedExecutor, StepClock, StepOutputs, StepPlan, StoreError, TokenId,
};
use pdserve_protocol::openai::SimMode;
use pdserve_protocol::params::{SamplingParams, StopParams};

use crate::kv::{KvError, KvRows};

/// What the executor receives with every plan item of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqParams {
    /// Sampling. `seed` is always `Some`: the prefill service draws one when the client gave none
    /// and the KV frame carries it to decode, so both sides draw from one seeded stream (the draw
    /// index of a token is its output index, the plan item's `num_output_tokens`).
    pub sampling: SamplingParams,
    /// Token-level stops. The executor masks EOS and `stop_token_ids` while sampling output index
    /// `k < min_tokens` (unless `ignore_eos` for EOS); the engine itself enforces `max_tokens` and
    /// stops on those ids.
    pub stop: StopParams,
}

/// The KV side of an executor: what the services need to move a request's latent KV between
/// instances. It mirrors the engine's `ModelExecutor` (`latent_shape`, `stage_arrived_kv`,
/// `export_kv`), whose per-layer [`LatentRows`](pdserve_engine::LatentRows) convert with
/// [`KvRows::from_layers`] / [`KvRows::to_layers`].
pub trait KvAccess {
    /// Per-token shape of the latent store: every cached layer (an MTP layer included when the
    /// executor keeps one).
    fn latent_shape(&self) -> LatentShape;

    /// Hands over KV that a prefill instance computed for `id`. The executor writes it into
    /// `id`'s blocks when a plan lists `id` in `kv_loads`, before running that plan; a listed
    /// request whose KV was never staged must get no output (the engine then fails it alone).
    /// Staged KV of a request that appears in a plan's `finished` is dropped.
    fn stage_arrived_kv(&mut self, id: RequestId, kv: KvRows) -> Result<(), KvError>;

    /// Positions `0..tokens` of every cached layer in the blocks of `table`.
    fn export_kv(&mut self, table: &[BlockId], tokens: usize) -> Result<KvRows, KvError>;
}

/// The worker's side of the clock: prices moving KV between instances in simulated time (the
/// fabric's KV-transfer model) and reports what the fabric saw in the last priced step.
pub trait KvTransferClock {
    /// Simulated duration of pushing the latent KV of `tokens` prompt tokens from this instance
    /// to a decode instance, ns (at the modeled shape, not the bytes actually sent).
    fn kv_transfer_ns(&mut self, tokens: usize) -> u64;

    /// The fabric's view of the step the engine's `StepClock` priced last, taken (so a step is
    /// reported once); `None` when the clock models no fabric (the linear stand-in) or the step
    /// could not be priced. Called on the compute thread right after each step is priced.
    fn take_step_report(&mut self) -> Option<FabricStepReport> {
        None
    }
}

/// One priced step as the simulated fabric saw it, in plain numbers (simulated time, before
/// `time_scale`); the services record it as the `pdserve_fabric_*` and `pdserve_ep_*` metrics
/// (docs/metrics.md defines each).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FabricStepReport {
    /// Bytes the dispatch/combine collectives moved over NVLink (scale-up), over the EP group.
    pub nvlink_bytes: f64,
    /// Bytes they moved over the NICs (InfiniBand, scale-out).
    pub ib_bytes: f64,
    /// NVLink busy time: `nvlink_bytes` over the group's aggregate effective NVLink bandwidth, s.
    pub nvlink_busy_s: f64,
    /// NIC busy time: `ib_bytes` over the group's aggregate effective NIC bandwidth, s.
    pub ib_busy_s: f64,
    /// Mean span (first issue to last arrival) of the step's dispatches, s; `None` without any.
    pub dispatch_s: Option<f64>,
    /// Mean span of the step's combines, s; `None` without any.
    pub combine_s: Option<f64>,
    /// Two-batch-overlap steps only: the fraction of communication hidden under compute,
    /// `(compute + comm − duration) / comm` clamped to `0..=1`.
    pub tbo_overlap_ratio: Option<f64>,
    /// Token-to-expert assignments per routed expert of the real model (index = expert id),
    /// summed over its MoE layers; empty when the routing is synthetic.
    pub expert_tokens: Vec<u64>,
    /// Mean over the real MoE layers of (mean GPU load / max GPU load); `None` without routing.
    pub balancedness: Option<f64>,
}

/// What an instance simulates, reported in its stats (`time_scale` comes from the config).
#[derive(Clone, Debug, PartialEq)]
pub struct SimLabel {
    /// Hardware profile name, e.g. `h800`.
    pub hardware: String,
    /// The model whose shape the timing models.
    pub modeled_model: String,
    /// Fabric model mode.
    pub mode: SimMode,
}

/// The compute side of one engine, moved onto its compute thread by
/// [`spawn_engine`](crate::spawn_engine).
#[derive(Debug)]
pub struct EngineParts<E, C> {
    /// Runs plans; owns the latent store.
    pub executor: E,
    /// Prices steps and KV transfers.
    pub clock: C,
    /// The model's end-of-sequence token ids (stop unless `ignore_eos`).
    pub eos_token_ids: Vec<TokenId>,
    /// What the clock simulates, for stats; `None` when nothing is labelled.
    pub sim: Option<SimLabel>,
}

/// A deterministic stand-in model: tokens from the engine's [`ScriptedExecutor`], and for every
/// position it computes (prefill chunks, decode inputs and drafts) latent rows that are a pure
/// function of `(token, position, layer)` ([`ScriptedBackend::latent_row`]), so a test can check
/// that KV moved between instances arrived intact. Arrived KV follows the [`KvAccess`] contract.
#[derive(Debug)]
pub struct ScriptedBackend {
    /// The token script.
    pub scripted: ScriptedExecutor,
    store: CpuLatentStore,
    staged: HashMap<RequestId, KvRows>,
}

impl ScriptedBackend {
    /// A backend with `num_blocks` blocks of `shape` (use the scheduler's `num_kv_blocks`).
    pub fn new(
        scripted: ScriptedExecutor,
        shape: LatentShape,
        num_blocks: usize,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            scripted,
            store: CpuLatentStore::new(shape, num_blocks)?,
            staged: HashMap::new(),
        })
    }

    /// The latent store (read-only).
    pub fn store(&self) -> &CpuLatentStore {
        &self.store
    }

    /// The rows this backend writes for `token` at `pos` in `layer`: (`c_kv`, `k_rope`), values
    /// in `[-1, 1)` exactly representable in `f32`.
    pub fn latent_row(
        shape: &LatentShape,
        token: TokenId,
        pos: usize,
        layer: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let value = |d: usize| {
            let mut h = u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (pos as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ ((layer * 4096 + d) as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
            h ^= h >> 29;
            h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h ^= h >> 32;
            (h % 65_536) as f32 / 32_768.0 - 1.0
        };
        let c_kv = (0..shape.kv_lora_rank).map(value).collect();
        let k_rope = (shape.kv_lora_rank..shape.floats_per_token_layer())
            .map(value)
            .collect();
        (c_kv, k_rope)
    }

    fn write_positions(
        &mut self,
        table: &[BlockId],
        start_pos: usize,
        tokens: &[TokenId],
    ) -> Result<(), StoreError> {
        let shape = self.store.shape();
        for layer in 0..shape.num_layers {
            let mut c_kv = Vec::with_capacity(tokens.len() * shape.kv_lora_rank);
            let mut k_rope = Vec::with_capacity(tokens.len() * shape.rope_dim);
            for (i, &t) in tokens.iter().enumerate() {
                let (c, r) = Self::latent_row(&shape, t, start_pos + i, layer);
                c_kv.extend(c);
                k_rope.extend(r);
            }
            self.store
                .write_rows(table, layer, start_pos, &c_kv, &k_rope)?;
        }
        Ok(())
    }
}

impl Executor<SeqParams> for ScriptedBackend {
    type Routing = ();
    type Error = StoreError;

    fn execute(&mut self, plan: &StepPlan<SeqParams>) -> Result<StepOutputs<()>, StoreError> {
        for (id, _) in &plan.finished {
            self.staged.remove(id);
        }
        let mut failed = HashSet::new();
        for load in &plan.kv_loads {
            match self.staged.remove(&load.id) {
                Some(kv) if kv.tokens == load.num_tokens => {
                    kv.scatter(&mut self.store, &load.block_table)
                        .map_err(|e| match e {
                            KvError::Store(e) => e,
                            _ => StoreError::Shape {
                                field: "num_layers",
                            },
                        })?;
                }
                _ => {
                    failed.insert(load.id);
                }
            }
        }
        for chunk in &plan.prefills {
            self.write_positions(&chunk.block_table, chunk.start_pos, &chunk.tokens)?;
        }
        for item in plan.decodes.iter().filter(|d| !failed.contains(&d.id)) {
            let mut tokens = vec![item.input_token];
            tokens.extend(item.draft_token);
            self.write_positions(&item.block_table, item.position, &tokens)?;
        }
        let Ok(mut out) =
            <ScriptedExecutor as Executor<SeqParams>>::execute(&mut self.scripted, plan);
        out.seqs.retain(|s| !failed.contains(&s.id));
        Ok(out)
    }
}

impl KvAccess for ScriptedBackend {
    fn latent_shape(&self) -> LatentShape {
        self.store.shape()
    }

    fn stage_arrived_kv(&mut self, id: RequestId, kv: KvRows) -> Result<(), KvError> {
        crate::kv::check_shape(&self.store.shape(), &kv.shape)?;
        self.staged.insert(id, kv);
        Ok(())
    }

    fn export_kv(&mut self, table: &[BlockId], tokens: usize) -> Result<KvRows, KvError> {
        KvRows::gather(&self.store, table, tokens)
    }
}

/// A clock linear in the batch (the engine's [`LinearStepClock`]) and in the KV transferred:
/// `kv_base_ns + kv_per_token_ns * tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearFabricClock {
    /// Step pricing.
    pub step: LinearStepClock,
    /// Fixed cost of one KV transfer.
    pub kv_base_ns: u64,
    /// Cost per transferred token.
    pub kv_per_token_ns: u64,
}

impl<R> StepClock<SeqParams, R> for LinearFabricClock {
    type Error = std::convert::Infallible;

    fn step_duration_ns(
        &mut self,
        plan: &StepPlan<SeqParams>,
        routing: &R,
    ) -> Result<u64, Self::Error> {
        <LinearStepClock as StepClock<SeqParams, R>>::step_duration_ns(
            &mut self.step,
            plan,
            routing,
        )
    }
}

impl KvTransferClock for LinearFabricClock {
    fn kv_transfer_ns(&mut self, tokens: usize) -> u64 {
        self.kv_base_ns
            .saturating_add(self.kv_per_token_ns.saturating_mul(tokens as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_engine::{Request, Scheduler, SchedulerConfig, StopConditions};

    const SHAPE: LatentShape = LatentShape {
        num_layers: 2,
        kv_lora_rank: 4,
        rope_dim: 2,
    };

    fn params() -> SeqParams {
        SeqParams {
            sampling: SamplingParams::default(),
            stop: StopParams {
                max_tokens: 4,
                stop_token_ids: vec![],
                ignore_eos: false,
                min_tokens: 0,
            },
        }
    }

    #[test]
    fn scripted_backend_writes_the_rows_of_every_computed_position() {
        let config = SchedulerConfig {
            num_kv_blocks: 8,
            max_context_tokens: 256,
            prefill_chunk_tokens: 3,
            ..SchedulerConfig::default()
        };
        let scheduler = Scheduler::new(config).unwrap();
        let mut state = scheduler.new_state::<SeqParams>();
        let stop = StopConditions {
            max_tokens: Some(3),
            ..StopConditions::default()
        };
        let prompt = vec![11, 12, 13, 14, 15];
        state
            .add_request(
                Request::new(RequestId(1), prompt.clone(), params())
                    .with_stop(stop)
                    .with_retained_kv(),
            )
            .unwrap();
        let mut backend = ScriptedBackend::new(ScriptedExecutor::new(100), SHAPE, 8).unwrap();
        let mut output = Vec::new();
        while state.has_work() {
            let plan = scheduler.step(0, &mut state).unwrap();
            let out = backend.execute(&plan).unwrap();
            for u in state.apply(out.seqs).unwrap() {
                output.extend(u.tokens);
            }
        }
        // Prompt plus all outputs but the last (never an input) are cached.
        let cached: Vec<u32> = prompt.iter().chain(&output[..2]).copied().collect();
        let table = state.block_table(RequestId(1)).to_vec();
        for layer in 0..2 {
            let rows = backend.store().gather(&table, layer, cached.len()).unwrap();
            for (pos, &t) in cached.iter().enumerate() {
                let (c, r) = ScriptedBackend::latent_row(&SHAPE, t, pos, layer);
                assert_eq!(&rows.c_kv[pos * 4..pos * 4 + 4], &c[..]);
                assert_eq!(&rows.k_rope[pos * 2..pos * 2 + 2], &r[..]);
            }
        }
    }

    #[test]
    fn arrived_kv_is_written_at_admission_and_missing_kv_fails_only_its_request() {
        let scheduler = Scheduler::new(SchedulerConfig {
            num_kv_blocks: 8,
            max_context_tokens: 256,
            ..SchedulerConfig::default()
        })
        .unwrap();
        let mut state = scheduler.new_state::<SeqParams>();
        let mut backend = ScriptedBackend::new(ScriptedExecutor::new(100), SHAPE, 8).unwrap();
        let prompt = vec![5, 6, 7];
        let mut data = Vec::new();
        for layer in 0..SHAPE.num_layers {
            for (pos, &t) in prompt.iter().enumerate() {
                let (c, r) = ScriptedBackend::latent_row(&SHAPE, t + 1, pos, layer);
                data.extend(c);
                data.extend(r);
            }
        }
        let kv = KvRows::new(SHAPE, 3, data).unwrap();
        backend.stage_arrived_kv(RequestId(1), kv.clone()).unwrap();
        for id in [1, 2] {
            let request = Request::new(RequestId(id), prompt.clone(), params()).with_kv_arrived(9);
            state.add_request(request).unwrap();
        }
        let plan = scheduler.step(0, &mut state).unwrap();
        assert_eq!(plan.kv_loads.len(), 2);
        let out = backend.execute(&plan).unwrap();
        let ids: Vec<u64> = out.seqs.iter().map(|s| s.id.0).collect();
        assert_eq!(ids, vec![1], "request 2 had no staged KV");
        let table = state.block_table(RequestId(1)).to_vec();
        assert_eq!(backend.export_kv(&table, 3).unwrap(), kv);
        let updates = state.apply(out.seqs).unwrap();
        let failed = updates.iter().find(|u| u.id == RequestId(2)).unwrap();
        assert_eq!(
            failed.finish.as_ref().map(|f| f.reason),
            Some(pdserve_engine::FinishReason::Error)
        );
    }

    #[test]
    fn latent_rows_differ_by_token_position_and_layer() {
        let base = ScriptedBackend::latent_row(&SHAPE, 1, 0, 0);
        assert_ne!(base, ScriptedBackend::latent_row(&SHAPE, 2, 0, 0));
        assert_ne!(base, ScriptedBackend::latent_row(&SHAPE, 1, 1, 0));
        assert_ne!(base, ScriptedBackend::latent_row(&SHAPE, 1, 0, 1));
        assert!(
            base.0
                .iter()
                .chain(&base.1)
                .all(|v| (-1.0..1.0).contains(v))
        );
    }

    #[test]
    fn linear_fabric_clock_prices_transfers_per_token() {
        let mut clock = LinearFabricClock {
            step: LinearStepClock {
                base_ns: 1,
                per_token_ns: 1,
            },
            kv_base_ns: 1_000,
            kv_per_token_ns: 70,
        };
        assert_eq!(clock.kv_transfer_ns(10), 1_700);
    }
}
