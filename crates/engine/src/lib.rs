//! pdserve's engine core: continuous batching over a paged latent-KV cache, as pure state machines.
//!
//! Principal types:
//! - [`Scheduler`] and [`EngineState`]: `scheduler.step(now_ns, &mut state)` plans a [`StepPlan`]
//!   (chunked prefills, decodes, KV loads for requests whose KV arrived from a prefill instance,
//!   preemptions); `state.apply(outputs)` appends the executor's tokens, checks [`StopConditions`] and
//!   frees finished sequences' blocks, returning [`SeqUpdate`]s to stream.
//! - [`BlockPool`]: the paged KV block allocator (64-token blocks); [`LatentStore`] /
//!   [`CpuLatentStore`]: the MLA latent rows (`c_kv`, `k_rope`) behind those blocks.
//! - [`Request`] / [`Sequence`]: a request and its state; [`StopChecker`] with an
//!   [`IncrementalDetokenizer`] for stop strings.
//! - [`split_two`]: balanced micro-batches for two-batch overlap; [`Pacer`]: release times and lag
//!   under simulated time; [`EngineStats`]: gauges and counters.
//! - Seams: [`Executor`] (the model runs a plan) and [`StepClock`] (the fabric prices it), with the
//!   stand-ins [`ScriptedExecutor`] and [`LinearStepClock`].
//! - The real implementations: [`ModelExecutor`] runs plans on pdserve-model's DeepSeek-V3 (paged
//!   latent cache, per-request seeded samplers, MTP drafting and [`spec`] verification, one forward
//!   per micro-batch under TBO, DP ranks from [`DpRanks`]) and returns a [`StepRouting`];
//!   [`FabricStepClock`] prices it on pdserve-fabric's simulated cluster (the real routing of every
//!   layer, TBO's 5-stage pipeline, Perfetto traces). [`StepDriver`] is the loop body that joins
//!   scheduler, executor, clock and [`Pacer`]; [`decode_bench`] is `pdserve bench decode`.
//!
//! Nothing here is async, reads a clock, sleeps or draws unseeded randomness (the driver and the
//! benchmark take the time as inputs). One task owns the state
//! (an actor whose cheap handle sends `add`/`cancel` commands with oneshot replies) and drives the loop:
//!
//! ```
//! use pdserve_engine::{
//!     Executor, LinearStepClock, Pacer, Request, RequestId, ScriptedExecutor, Scheduler,
//!     SchedulerConfig, StepClock, StopConditions,
//! };
//!
//! let scheduler = Scheduler::new(SchedulerConfig {
//!     num_kv_blocks: 64,
//!     max_context_tokens: 2048,
//!     spec_tokens: 1, // MTP: verify one draft token per decode step
//!     ..SchedulerConfig::default()
//! })?;
//! let mut state = scheduler.new_state::<()>(); // `()`: no sampling parameters in this example
//! let stop = StopConditions { max_tokens: Some(8), ..StopConditions::default() };
//! state.add_request(Request::new(RequestId(1), vec![1, 2, 3], ()).with_stop(stop))?;
//!
//! let mut executor = ScriptedExecutor::new(1000); // the model's stand-in
//! let mut clock = LinearStepClock { base_ns: 50_000, per_token_ns: 1_000 }; // the fabric's
//! let mut pacer = Pacer::new(1.0)?; // release results after the simulated duration
//! let (mut now_ns, mut output) = (0u64, Vec::new());
//! while state.has_work() {
//!     let plan = scheduler.step(now_ns, &mut state)?;
//!     // (write plan.kv_loads into the latent store here)
//!     let Ok(out) = executor.execute(&plan);
//!     let Ok(sim_ns) = clock.step_duration_ns(&plan, &out.routing);
//!     for update in state.apply(out.seqs)? {
//!         output.extend(update.tokens);
//!     }
//!     // Here compute takes no real time: real_end == start, so the pacer waits the whole sim_ns.
//!     let pace = pacer.pace(now_ns, sim_ns, now_ns);
//!     assert_eq!(pace.wait_ns, sim_ns);
//!     now_ns = pace.release_ns;
//! }
//! assert_eq!(output.len(), 8);
//! assert_eq!(output[0], executor.token(RequestId(1), 0));
//! assert_eq!(state.stats().kv_blocks_used, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The same loop on the real model and the simulated fabric (a service constructs these two from
//! its model directory and config):
//!
//! ```no_run
//! use pdserve_engine::{
//!     ClockConfig, ExecutorConfig, FabricStepClock, ModelExecutor, Pacer, Request, RequestId,
//!     Scheduler, SchedulerConfig, StepDriver,
//! };
//! use pdserve_model::SamplingParams;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let scheduler = Scheduler::new(SchedulerConfig { spec_tokens: 1, ..SchedulerConfig::default() })?;
//! let dir = pdserve_model::tiny::ensure_default(None)?;
//! let clock = FabricStepClock::new(ClockConfig { ep_size: 16, ..ClockConfig::default() })?;
//! let executor = ModelExecutor::load(&dir, ExecutorConfig::for_scheduler(scheduler.config(), 16))?;
//! let mut driver = StepDriver::new(scheduler, executor, clock, Pacer::new(1.0)?);
//! driver.state_mut().add_request(Request::new(RequestId(1), vec![0, 17, 42], SamplingParams::greedy()))?;
//! let origin = std::time::Instant::now();
//! let mut now = || origin.elapsed().as_nanos() as u64;
//! while driver.state().has_work() {
//!     let start = now();
//!     let report = driver.step(start, &mut now)?;
//!     std::thread::sleep(std::time::Duration::from_nanos(report.pace.wait_ns));
//!     // stream report.updates; report.sim_ns is the step's simulated time, report.pace.lag_ns its lag
//! }
//! # Ok(())
//! # }
//! ```

mod block_pool;
mod clock;
mod config;
pub mod decode_bench;
mod dp;
mod driver;
mod executor;
mod latent_store;
mod microbatch;
mod model_exec;
mod pacing;
mod plan;
mod scheduler;
mod sequence;
pub mod spec;
mod state;
mod stats;
mod stop;

pub use block_pool::{BLOCK_SIZE_TOKENS, BlockId, BlockPool, PoolError, blocks_for_tokens};
pub use clock::{ClockConfig, ClockError, FabricStepClock, RoutingSource, StepTiming};
pub use config::{ConfigError, SchedulerConfig};
pub use decode_bench::{DecodeBenchConfig, DecodeBenchReport, run_decode_bench};
pub use dp::DpRanks;
pub use driver::{StepDriver, StepReport};
pub use executor::{
    Executor, LinearStepClock, ScriptedExecutor, SeqOutput, StepClock, StepOutputs,
};
pub use latent_store::{CpuLatentStore, LatentRows, LatentShape, LatentStore, StoreError};
pub use microbatch::{MicroBatchSplit, WorkItem, WorkWeights, split_two};
pub use model_exec::{
    ArrivedKv, DraftMode, ExecError, ExecStats, ExecutorConfig, ExpertBackend, ModelExecutor,
    RoutedRequest, StepRouting,
};
pub use pacing::{Pace, Pacer, PacerError};
pub use plan::{DecodeItem, KvLoad, PrefillChunk, StepPlan};
pub use scheduler::Scheduler;
pub use sequence::{KvSource, Phase, Request, RequestId, Sequence, SequenceState, TokenId};
pub use state::{AdmitError, EngineState, LookupError, SeqUpdate, StepError};
pub use stats::{EngineStats, FinishCounts};
pub use stop::{
    DetokenizeError, Finish, FinishReason, IncrementalDetokenizer, StopChecker, StopConditions,
    StopConfigError, StopMatch,
};
