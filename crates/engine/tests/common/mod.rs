//! Shared harness of the engine's model-backed tests: the tiny golden checkpoint (3 layers, 2 MoE
//! layers with DeepSeek-V3's routing structure, an MTP module, vocabulary 512), loaded once, and an
//! engine loop (scheduler + [`ModelExecutor`] + [`FabricStepClock`] + pacer) that runs requests to
//! completion on a fake clock.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the harness"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use pdserve_engine::{
    ClockConfig, DraftMode, EngineStats, ExecStats, ExecutorConfig, ExpertBackend, FabricStepClock,
    ModelExecutor, Pacer, Request, RequestId, Scheduler, SchedulerConfig, StepDriver, StepReport,
    StopConditions, TokenId, WorkWeights,
};
use pdserve_ep::{EpGroup, EpRuntimeConfig, PlacementConfig, RebalancerConfig};
use pdserve_model::rng::SplitMix64;
use pdserve_model::{Checkpoint, DeepSeekV3, LocalExperts, SamplingParams};

/// The tiny golden checkpoint of the model crate.
pub fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/goldens/tiny")
}

/// The tiny model and its experts, loaded once per test binary.
pub fn model() -> (Arc<DeepSeekV3>, LocalExperts) {
    static MODEL: OnceLock<(Arc<DeepSeekV3>, LocalExperts)> = OnceLock::new();
    let (m, e) = MODEL.get_or_init(|| {
        let (m, e) = DeepSeekV3::load(&tiny_dir(), &Device::Cpu).expect("tiny golden checkpoint");
        (Arc::new(m), e)
    });
    (m.clone(), e.clone())
}

/// Engine settings varied by the tests.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub tbo: bool,
    pub mtp: bool,
    pub draft: DraftMode,
    pub split_micro_batches: bool,
    pub num_kv_blocks: usize,
    pub prefill_chunk_tokens: usize,
    pub max_batched_tokens: usize,
    /// GPUs of the modeled EP group (16 is the smallest H800 group holding DeepSeek-V3).
    pub ep_size: u32,
    /// Pacing scale.
    pub time_scale: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            tbo: false,
            mtp: false,
            draft: DraftMode::Greedy,
            split_micro_batches: true,
            num_kv_blocks: 64,
            prefill_chunk_tokens: 16,
            max_batched_tokens: 256,
            ep_size: 16,
            time_scale: 1.0,
        }
    }
}

/// One request of a test.
#[derive(Clone, Debug)]
pub struct Req {
    pub id: u64,
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    pub max_tokens: usize,
}

/// `n` requests with prompts of 3 to 40 tokens (some longer than one prefill chunk).
pub fn requests(n: u64, temperature: f32, max_tokens: usize) -> Vec<Req> {
    let mut rng = SplitMix64::new(7);
    (0..n)
        .map(|id| {
            let len = 3 + (id as usize * 13) % 38;
            Req {
                id,
                prompt: (0..len)
                    .map(|_| (rng.next_u64() % 500) as TokenId + 2)
                    .collect(),
                params: SamplingParams {
                    temperature,
                    seed: Some(1000 + id),
                    ..SamplingParams::default()
                },
                max_tokens,
            }
        })
        .collect()
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    /// Output tokens of each request.
    pub tokens: BTreeMap<u64, Vec<TokenId>>,
    pub engine: EngineStats,
    pub exec: ExecStats,
    pub reports: Vec<StepReport>,
    pub lag_ns_total: u64,
}

pub type Driver<X = LocalExperts> = StepDriver<SamplingParams, ModelExecutor<X>, FabricStepClock>;

/// A driver for `knobs` on the tiny model with local experts, priced as DeepSeek-V3 on H800
/// (detailed mode).
pub fn driver(knobs: &Knobs) -> Driver {
    let (model, experts) = model();
    driver_with(knobs, model, experts)
}

/// The same with the routed experts on the EP runtime (`knobs.ep_size` ranks, redundant slots,
/// EPLB every `rebalance_period_steps` steps).
pub fn driver_ep(knobs: &Knobs, rebalance_period_steps: u64) -> Driver<EpGroup> {
    let (model, _) = model();
    let ckpt = Checkpoint::open(&tiny_dir()).expect("checkpoint");
    let config = EpRuntimeConfig {
        placement: PlacementConfig {
            num_ranks: knobs.ep_size as usize,
            num_redundant_experts: knobs.ep_size as usize,
            ..PlacementConfig::default()
        },
        rebalancer: RebalancerConfig {
            period_steps: rebalance_period_steps,
            ..RebalancerConfig::default()
        },
        ..EpRuntimeConfig::default()
    };
    let group = EpGroup::load(&ckpt, config, &Device::Cpu).expect("EP group");
    driver_with(knobs, model, group)
}

fn driver_with<X: ExpertBackend>(knobs: &Knobs, model: Arc<DeepSeekV3>, experts: X) -> Driver<X> {
    let max_context_tokens = 128;
    let scheduler = Scheduler::new(SchedulerConfig {
        num_kv_blocks: knobs.num_kv_blocks,
        max_batched_tokens: knobs.max_batched_tokens,
        max_running_seqs: 64,
        prefill_chunk_tokens: knobs.prefill_chunk_tokens,
        max_context_tokens,
        spec_tokens: usize::from(knobs.mtp),
        two_batch_overlap: knobs.tbo.then(WorkWeights::default),
    })
    .expect("scheduler config");
    let executor = ModelExecutor::new(
        model,
        experts,
        ExecutorConfig {
            draft: knobs.draft,
            split_micro_batches: knobs.split_micro_batches,
            ..ExecutorConfig::for_scheduler(scheduler.config(), knobs.ep_size)
        },
    )
    .expect("executor");
    let clock = FabricStepClock::new(ClockConfig {
        ep_size: knobs.ep_size,
        ..ClockConfig::default()
    })
    .expect("clock");
    StepDriver::new(
        scheduler,
        executor,
        clock,
        Pacer::new(knobs.time_scale).expect("pacer"),
    )
}

/// Adds `reqs` to the driver.
pub fn add<X: ExpertBackend>(driver: &mut Driver<X>, reqs: &[Req]) {
    for r in reqs {
        let stop = StopConditions {
            max_tokens: Some(r.max_tokens),
            ..StopConditions::default()
        };
        driver
            .state_mut()
            .add_request(
                Request::new(RequestId(r.id), r.prompt.clone(), r.params.clone()).with_stop(stop),
            )
            .expect("request admitted");
    }
}

/// Runs the driver until every request finished; every step "computes" for 1 ms of fake time.
pub fn finish<X: ExpertBackend>(mut driver: Driver<X>) -> Run {
    let mut tokens: BTreeMap<u64, Vec<TokenId>> = BTreeMap::new();
    let mut reports = Vec::new();
    let mut t = 0u64;
    let mut steps = 0;
    while driver.state().has_work() {
        steps += 1;
        assert!(steps < 1000, "the engine makes no progress");
        let report = driver
            .step(t, &mut || {
                t += 500_000;
                t
            })
            .expect("step");
        assert_eq!(report.error, None, "step {} failed", report.step_id);
        assert_eq!(driver.clock().errors_total(), 0);
        for u in &report.updates {
            tokens.entry(u.id.0).or_default().extend(&u.tokens);
        }
        t = report.pace.release_ns;
        reports.push(report);
    }
    Run {
        tokens,
        engine: driver.state().stats().clone(),
        exec: driver.executor().stats().clone(),
        lag_ns_total: driver.pacer().lag_ns_total(),
        reports,
    }
}

/// Runs `reqs` to completion with `knobs`.
pub fn run(knobs: &Knobs, reqs: &[Req]) -> Run {
    let mut d = driver(knobs);
    add(&mut d, reqs);
    finish(d)
}
