//! The engine's compute thread: owns the [`EngineParts`] (executor with its latent store, clock)
//! and runs jobs in the order the actor sends them.
//!
//! Ordering is the invariant that makes KV hand-over safe: an arrived request's KV is staged
//! (`Job::Stage`, sent when the request is submitted) before any step that can list it in
//! `kv_loads`, and a finished prefill's KV is exported (`Job::Export`) after the step that
//! computed it and before its blocks are released.

use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use pdserve_engine::{BlockId, Executor, RequestId, SeqOutput, StepClock, StepPlan};
use tokio::sync::oneshot;

use super::{ExportError, ExportedKv};
use crate::backend::{EngineParts, FabricStepReport, KvAccess, KvTransferClock, SeqParams};
use crate::kv::KvRows;

/// What one step produced.
#[derive(Debug)]
pub(crate) struct StepDone {
    pub(crate) outputs: Result<Vec<SeqOutput>, String>,
    pub(crate) simulated_ns: u64,
    pub(crate) wall_ns: u64,
    /// Batch size and the fabric's view of the step, for metrics.
    pub(crate) detail: StepDetail,
}

/// What the metrics record of a step besides its durations.
#[derive(Debug, Default)]
pub(crate) struct StepDetail {
    /// Tokens in the plan (prompt chunks plus decode slots).
    pub(crate) batch_tokens: usize,
    /// The clock's fabric report of the step, when it models a fabric and priced the step.
    pub(crate) fabric: Option<FabricStepReport>,
}

#[derive(Debug)]
pub(crate) enum Job {
    Step {
        plan: StepPlan<SeqParams>,
        reply: oneshot::Sender<StepDone>,
    },
    Stage {
        id: RequestId,
        rows: KvRows,
    },
    Export {
        request_id: String,
        table: Vec<BlockId>,
        tokens: usize,
        draft_token: Option<u32>,
        reply: oneshot::Sender<Result<ExportedKv, ExportError>>,
    },
}

/// Starts the compute thread; it ends when the returned sender is dropped.
pub(crate) fn spawn<E, C>(parts: EngineParts<E, C>) -> std::io::Result<std_mpsc::Sender<Job>>
where
    E: Executor<SeqParams> + KvAccess + Send + 'static,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
{
    let (tx, rx) = std_mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("pdserve-engine".into())
        .spawn(move || run(parts, rx))?;
    Ok(tx)
}

fn run<E, C>(mut parts: EngineParts<E, C>, jobs: std_mpsc::Receiver<Job>)
where
    E: Executor<SeqParams> + KvAccess,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock,
{
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Step { plan, reply } => {
                let mut done = step(&mut parts, &plan);
                done.detail = StepDetail {
                    batch_tokens: plan.num_batched_tokens,
                    fabric: parts.clock.take_step_report(),
                };
                let _ = reply.send(done);
            }
            Job::Stage { id, rows } => {
                // A refusal leaves the request without KV; the executor then gives it no output
                // and the engine fails that request alone.
                if let Err(e) = parts.executor.stage_arrived_kv(id, rows) {
                    tracing::warn!(request = %id, error = %e, "staging arrived KV failed");
                }
            }
            Job::Export {
                request_id,
                table,
                tokens,
                draft_token,
                reply,
            } => {
                let exported = parts
                    .executor
                    .export_kv(&table, tokens)
                    .map(|rows| ExportedKv {
                        rows,
                        draft_token,
                        transfer_simulated_ns: parts.clock.kv_transfer_ns(tokens),
                    })
                    .map_err(|source| ExportError::Store {
                        id: request_id,
                        source,
                    });
                let _ = reply.send(exported);
            }
        }
    }
}

fn step<E, C>(parts: &mut EngineParts<E, C>, plan: &StepPlan<SeqParams>) -> StepDone
where
    E: Executor<SeqParams> + KvAccess,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock,
{
    let started = Instant::now();
    let out = match parts.executor.execute(plan) {
        Ok(out) => out,
        Err(e) => {
            return StepDone {
                outputs: Err(format!("executor: {e}")),
                simulated_ns: 0,
                wall_ns: 0,
                detail: StepDetail::default(),
            };
        }
    };
    let wall_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match parts.clock.step_duration_ns(plan, &out.routing) {
        Ok(simulated_ns) => StepDone {
            outputs: Ok(out.seqs),
            simulated_ns,
            wall_ns,
            detail: StepDetail::default(),
        },
        // The step's requests fail (the actor finishes them with `error`); nothing is released
        // at a made-up simulated time.
        Err(e) => {
            tracing::error!(step = plan.step_id, error = %e, "the step clock could not price a step; failing its requests");
            StepDone {
                outputs: Err(format!("clock: {e}")),
                simulated_ns: 0,
                wall_ns,
                detail: StepDetail::default(),
            }
        }
    }
}
