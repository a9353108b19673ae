//! Running a decode benchmark and summarizing it.
//!
//! Definitions (over the measured steps only):
//! - simulated TPOT = mean simulated step time / (output tokens / decodes): the simulated time a
//!   user waits per token (with MTP a decode can give a user two tokens);
//! - simulated tokens/s per user = 1 / TPOT; per GPU = output tokens / Σ simulated time / EP size;
//!   per node = per GPU × the profile's GPUs per node;
//! - real step time: wall time from a step's start to the end of its compute (planning, the model,
//!   pricing, applying); real tokens/s = output tokens / Σ real step time;
//! - lag: per step `max(0, real end − (start + simulated × time_scale))`, summed.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use pdserve_ep::EpGroup;
use pdserve_fabric::{Mode, PaperAssumptions, paper_analysis};
use pdserve_model::rng::SplitMix64;
use pdserve_model::{Checkpoint, DeepSeekV3, LocalExperts, ModelError, SamplingParams};
use serde::Serialize;

use super::{BenchError, DecodeBenchConfig};
use crate::block_pool::blocks_for_tokens;
use crate::clock::FabricStepClock;
use crate::config::SchedulerConfig;
use crate::driver::StepDriver;
use crate::microbatch::WorkWeights;
use crate::model_exec::{ExecutorConfig, ExpertBackend, ModelExecutor};
use crate::pacing::Pacer;
use crate::scheduler::Scheduler;
use crate::sequence::{Request, RequestId};
use crate::stop::StopConditions;

/// Step budget while the prompts are prefilled (tokens per step beyond the decodes').
const PREFILL_BUDGET_TOKENS: usize = 8192;

/// The benchmark's view of time: a monotonic clock in ns and a sleep.
pub struct BenchTime<'a> {
    /// Current time, ns, monotonic.
    pub now_ns: &'a mut dyn FnMut() -> u64,
    /// Waits this many ns.
    pub sleep_ns: &'a mut dyn FnMut(u64),
}

impl std::fmt::Debug for BenchTime<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BenchTime")
    }
}

/// Results of a decode benchmark (see the module docs for the definitions).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecodeBenchReport {
    /// The config's description.
    pub description: String,
    /// Real model checkpoint.
    pub model_dir: PathBuf,
    /// Hardware profile.
    pub hardware: String,
    /// Modeled shape (`model_type`).
    pub modeled_model: String,
    /// Modeled hidden size.
    pub hidden_size: u64,
    /// Fabric mode.
    pub mode: Mode,
    /// GPUs in the EP group.
    pub ep_size: u32,
    /// GPUs per node of the profile.
    pub gpus_per_node: u32,
    /// Concurrent requests.
    pub requests: usize,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Two-micro-batch overlap.
    pub tbo: bool,
    /// MTP speculative decoding.
    pub mtp: bool,
    /// How the real routing prices the modeled layers.
    pub routing_note: String,
    /// Where the routed experts ran: `local` or `ep-runtime` (with its placement pricing steps).
    pub experts: String,
    /// Steps spent prefilling the prompts (not measured).
    pub warmup_steps: usize,
    /// Measured decode steps.
    pub steps: usize,
    /// Output tokens of the measured steps.
    pub output_tokens: u64,
    /// Decodes in the measured steps (requests × steps while every request decodes every step).
    pub decodes: u64,
    /// Mean simulated step time, ms.
    pub sim_step_ms: f64,
    /// Simulated time per output token of one user, ms.
    pub sim_tpot_ms: f64,
    /// Simulated tokens/s seen by one user.
    pub sim_tokens_per_s_per_user: f64,
    /// Simulated tokens/s per GPU.
    pub sim_tokens_per_s_per_gpu: f64,
    /// Simulated tokens/s per node.
    pub sim_tokens_per_s_per_node: f64,
    /// The paper's closed-form TPOT at this hidden size, batch and link (analysis mode without MTP).
    pub analytic_tpot_ms: Option<f64>,
    /// Mean real wall time per step, ms.
    pub real_step_ms: f64,
    /// Mean real time of planning and the model per step, ms.
    pub real_execute_ms: f64,
    /// Real steps per second.
    pub real_steps_per_s: f64,
    /// Real output tokens per second.
    pub real_tokens_per_s: f64,
    /// Pacing scale.
    pub time_scale: f64,
    /// Steps released after their paced time.
    pub late_steps: usize,
    /// Total lag, ms.
    pub lag_ms_total: f64,
    /// Drafts verified.
    pub drafts: u64,
    /// Drafts accepted (draft position 0).
    pub drafts_accepted: u64,
    /// Accepted / verified.
    pub acceptance_rate: Option<f64>,
    /// Chrome/Perfetto trace of the last measured step, when asked for.
    #[serde(skip)]
    pub trace_json: Option<String>,
}

/// Runs the benchmark of `config` (see the module docs); `record_trace` keeps the last measured
/// step's timeline in [`DecodeBenchReport::trace_json`].
pub fn run_decode_bench(
    config: &DecodeBenchConfig,
    time: &mut BenchTime<'_>,
    record_trace: bool,
) -> Result<DecodeBenchReport, BenchError> {
    config.validate()?;
    let model_dir = match &config.model_dir {
        Some(d) => d.clone(),
        None => pdserve_model::tiny::ensure_default(None)?,
    };
    let ckpt = Checkpoint::open(&model_dir)?;
    let model = Arc::new(DeepSeekV3::from_checkpoint(&ckpt, &Device::Cpu)?);
    let requests = config.num_requests();
    let spec = usize::from(config.engine.mtp);
    // Requests admitted first decode while later prompts are still prefilling: leave room for two
    // tokens per step of the whole run (prefill steps included), so that no request finishes
    // before the measured steps end.
    let warmup_limit = warmup_limit(config);
    let max_output = 2 * (config.steps + warmup_limit) + 8;
    let max_context = config.workload.prompt_tokens + max_output + 1;
    let model_positions = model.config().max_position_embeddings;
    if max_context > model_positions {
        return Err(BenchError::Invalid {
            field: "workload.prompt_tokens",
            problem: format!(
                "{} prompt tokens plus {max_output} output tokens exceed the model's {model_positions} \
                 positions",
                config.workload.prompt_tokens
            ),
        });
    }
    let scheduler = Scheduler::new(SchedulerConfig {
        num_kv_blocks: requests * blocks_for_tokens(max_context + spec),
        max_batched_tokens: (requests * (1 + spec)).max(PREFILL_BUDGET_TOKENS),
        max_running_seqs: requests,
        prefill_chunk_tokens: config.workload.prompt_tokens,
        max_context_tokens: max_context,
        spec_tokens: spec,
        two_batch_overlap: config.engine.tbo.then(WorkWeights::default),
    })?;
    let exec_config = ExecutorConfig {
        draft: config.engine.draft,
        split_micro_batches: config.engine.split_micro_batches,
        seed: config.seed,
        ..ExecutorConfig::for_scheduler(scheduler.config(), config.fabric.ep_size)
    };
    let clock = FabricStepClock::new(config.fabric.clone())?;
    if let Ok(moe) = model.config().moe() {
        clock.check_real_model(moe.n_routed_experts)?;
    }
    let setup = Setup {
        config,
        model_dir,
        scheduler,
        clock,
        max_output,
    };
    match &config.ep {
        None => {
            let experts = LocalExperts::load(&ckpt, &Device::Cpu)?;
            let executor = ModelExecutor::new(model, experts, exec_config)?;
            measure(setup, executor, time, record_trace)
        }
        Some(ep) => {
            let mut ep = ep.clone();
            ep.placement.num_ranks = config.fabric.ep_size as usize;
            let group = EpGroup::load(&ckpt, ep, &Device::Cpu).map_err(ModelError::from)?;
            let executor = ModelExecutor::new(model, group, exec_config)?;
            measure(setup, executor, time, record_trace)
        }
    }
}

/// Everything built before the experts.
struct Setup<'c> {
    config: &'c DecodeBenchConfig,
    model_dir: PathBuf,
    scheduler: Scheduler,
    clock: FabricStepClock,
    max_output: usize,
}

fn measure<X: ExpertBackend>(
    setup: Setup<'_>,
    executor: ModelExecutor<X>,
    time: &mut BenchTime<'_>,
    record_trace: bool,
) -> Result<DecodeBenchReport, BenchError> {
    let Setup {
        config,
        model_dir,
        scheduler,
        clock,
        max_output,
    } = setup;
    let model = executor.model().clone();
    let requests = config.num_requests();
    let real_moe_layers = (0..model.config().num_hidden_layers)
        .filter(|&l| model.config().is_moe_layer(l))
        .count();
    let pacer = Pacer::new(config.engine.time_scale)?;
    let mut driver = StepDriver::new(scheduler, executor, clock, pacer);

    let vocab = model.config().vocab_size as u64;
    let mut rng = SplitMix64::new(config.seed);
    for i in 0..requests as u64 {
        let prompt = (0..config.workload.prompt_tokens)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let params = SamplingParams {
            temperature: config.workload.temperature,
            seed: Some(config.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ..SamplingParams::default()
        };
        let stop = StopConditions {
            max_tokens: Some(max_output),
            ..StopConditions::default()
        };
        driver
            .state_mut()
            .add_request(Request::new(RequestId(i), prompt, params).with_stop(stop))?;
    }

    // Prefill every prompt (not measured).
    let warmup_limit = warmup_limit(config);
    let mut warmup_steps = 0;
    loop {
        let start = (time.now_ns)();
        let r = driver.step(start, time.now_ns)?;
        warmup_steps += 1;
        check_step(&r.error)?;
        if r.num_prefill_tokens == 0 && driver.state().stats().num_waiting == 0 {
            break;
        }
        if warmup_steps > warmup_limit {
            return Err(BenchError::Invalid {
                field: "workload",
                problem: format!("prompts still prefilling after {warmup_steps} steps"),
            });
        }
    }

    let before = driver.state().stats().clone();
    let (mut sim_ns, mut real_ns, mut exec_ns, mut lag_ns) = (0u64, 0u64, 0u64, 0u64);
    let (mut late_steps, mut output_tokens, mut decodes) = (0usize, 0u64, 0u64);
    let mut trace_json = None;
    for i in 0..config.steps {
        let last = i + 1 == config.steps;
        if last && record_trace {
            driver.clock_mut().record_next_step();
        }
        let start = (time.now_ns)();
        let r = driver.step(start, time.now_ns)?;
        check_step(&r.error)?;
        (time.sleep_ns)(r.pace.wait_ns);
        sim_ns += r.sim_ns;
        real_ns += r.real_ns;
        exec_ns += r.execute_ns;
        lag_ns += r.pace.lag_ns;
        late_steps += usize::from(r.pace.lag_ns > 0);
        output_tokens += r.num_output_tokens as u64;
        decodes += r.num_decodes as u64;
        if last && record_trace {
            trace_json = driver.clock_mut().take_trace().map(|t| t.to_chrome_json());
        }
    }
    let after = driver.state().stats();
    let drafts = after.spec_draft_tokens_total - before.spec_draft_tokens_total;
    let drafts_accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total;

    let clock = driver.clock();
    let fabric = clock.fabric();
    let profile = fabric.profile();
    let shape = fabric.shape();
    let steps = config.steps as f64;
    let sim_s = sim_ns as f64 / 1e9;
    // Tokens a decoding request gets per step (1 + accepted drafts).
    let tokens_per_decode = output_tokens as f64 / decodes.max(1) as f64;
    let sim_tpot_ms = if tokens_per_decode > 0.0 {
        sim_ns as f64 / 1e6 / steps / tokens_per_decode
    } else {
        0.0
    };
    let per_gpu = if sim_s > 0.0 {
        output_tokens as f64 / sim_s / f64::from(config.fabric.ep_size)
    } else {
        0.0
    };
    let analytic_tpot_ms =
        (config.fabric.mode == Mode::Analysis && !config.engine.mtp).then(|| {
            let rpg = u64::from(config.workload.requests_per_gpu);
            let micro_batches = if config.engine.tbo { 2 } else { 1 };
            let assumptions = PaperAssumptions {
                tokens_per_micro_batch: rpg / micro_batches,
                micro_batches,
                layers: shape.num_hidden_layers,
                ..PaperAssumptions::paper(shape.hidden_size)
            };
            paper_analysis(profile, assumptions, profile.analysis_link()).tpot_ms
        });
    Ok(DecodeBenchReport {
        description: config.description.clone(),
        model_dir,
        hardware: profile.name.clone(),
        modeled_model: shape.model_type.clone(),
        hidden_size: shape.hidden_size,
        mode: config.fabric.mode,
        ep_size: config.fabric.ep_size,
        gpus_per_node: profile.node.gpus_per_node,
        requests,
        prompt_tokens: config.workload.prompt_tokens,
        tbo: config.engine.tbo,
        mtp: config.engine.mtp,
        routing_note: clock.routing_note(real_moe_layers),
        experts: if config.ep.is_some() {
            "ep-runtime".into()
        } else {
            "local".into()
        },
        warmup_steps,
        steps: config.steps,
        output_tokens,
        decodes,
        sim_step_ms: sim_ns as f64 / 1e6 / steps,
        sim_tpot_ms,
        sim_tokens_per_s_per_user: if sim_tpot_ms > 0.0 {
            1e3 / sim_tpot_ms
        } else {
            0.0
        },
        sim_tokens_per_s_per_gpu: per_gpu,
        sim_tokens_per_s_per_node: per_gpu * f64::from(profile.node.gpus_per_node),
        analytic_tpot_ms,
        real_step_ms: real_ns as f64 / 1e6 / steps,
        real_execute_ms: exec_ns as f64 / 1e6 / steps,
        real_steps_per_s: if real_ns > 0 {
            steps * 1e9 / real_ns as f64
        } else {
            0.0
        },
        real_tokens_per_s: if real_ns > 0 {
            output_tokens as f64 * 1e9 / real_ns as f64
        } else {
            0.0
        },
        time_scale: config.engine.time_scale,
        late_steps,
        lag_ms_total: lag_ns as f64 / 1e6,
        drafts,
        drafts_accepted,
        acceptance_rate: (drafts > 0).then(|| drafts_accepted as f64 / drafts as f64),
        trace_json,
    })
}

/// The most steps the prompts may take to prefill.
fn warmup_limit(config: &DecodeBenchConfig) -> usize {
    config.num_requests() * config.workload.prompt_tokens / PREFILL_BUDGET_TOKENS + 16
}

fn check_step(error: &Option<String>) -> Result<(), BenchError> {
    match error {
        Some(message) => Err(BenchError::StepFailed(message.clone())),
        None => Ok(()),
    }
}
