//! The engine actor: one async task owns the engine state (scheduler,
//! [`EngineState`](pdserve_engine::EngineState) with its block pool, pacer, per-request
//! streams); a dedicated OS thread owns the compute side ([`EngineParts`]: executor with its
//! latent store, clock) so model steps never block the runtime. Everyone else holds an
//! [`EngineHandle`], a cheap `Clone` that sends commands with oneshot replies.
//!
//! The loop: when work exists, `scheduler.step(now)` → the compute thread runs the executor
//! (which writes the plan's arrived KV, staged when the request was submitted) and prices the
//! step → `state.apply(outputs)` → the step's updates are released no earlier than
//! `step start + simulated × time_scale` (the pacer; lag is counted when the host was slower;
//! `time_scale = 0` disables pacing) → each request's [`RequestStream`] receives its
//! [`EngineEvent`]s. Commands (submit, cancel, stats) are served while a step computes or waits
//! for its release.
//!
//! Invariants:
//! - every accepted submission ends with exactly one terminal event, [`EngineEvent::Done`] or
//!   [`EngineEvent::Failed`] (also when a step fails, the engine breaks, or it stops);
//! - cancelling frees the request's blocks at once (also a finished prefill's retained KV);
//!   dropping a [`RequestStream`] before its terminal event cancels the request;
//! - a request submitted with `KvInput::Compute { retain: true }` gets
//!   [`EngineEvent::KvRetained`] when its generation ends and keeps its blocks until
//!   [`EngineHandle::release_kv`] (→ `Done`) or a cancel (→ `Failed`);
//! - queues are bounded: a submission beyond `max_waiting_requests` queued requests, or one that
//!   finds the command queue full, is refused ([`SubmitError`], 429), never queued unboundedly.

mod actor;
mod compute;

use std::sync::Arc;

use pdserve_engine::{
    EngineStats, Executor, LatentShape, Pacer, RequestId, Scheduler, SchedulerConfig, StepClock,
};
use pdserve_protocol::internal::{SampledToken, TokenLogprob};
use pdserve_protocol::openai::FinishReason;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::sync::{mpsc, oneshot};

use crate::backend::{EngineParts, KvAccess, KvTransferClock, SeqParams, SimLabel};
use crate::config::{ConfigError, EngineConfig};
use crate::kv::{KvError, KvRows};
use crate::metrics::EngineMetrics;

/// What a request brings besides its prompt.
#[derive(Debug)]
pub enum KvInput {
    /// Compute the prompt here (chunked prefill). `retain`: keep the KV blocks when the
    /// generation ends, until released or cancelled (a prefill instance pushing KV to decode).
    Compute {
        /// Keep the KV after the generation ends.
        retain: bool,
    },
    /// The prompt's KV was computed by a prefill instance, which also sampled the first token.
    Arrived(PrefilledKv),
}

/// KV computed elsewhere, with the first token.
#[derive(Debug)]
pub struct PrefilledKv {
    /// The first token (emitted first, with its logprobs).
    pub first_token: SampledToken,
    /// Prefill's MTP draft for the next token, verified in the first decode step (ignored
    /// without speculative decoding).
    pub draft_token: Option<u32>,
    /// The prompt's latent KV (`tokens` must equal the prompt length).
    pub rows: KvRows,
}

/// A request for the engine.
#[derive(Debug)]
pub struct Submission {
    /// Unique among the engine's live requests.
    pub request_id: String,
    /// Prompt token ids (non-empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Sampling and token-level stops, handed to the executor.
    pub params: SeqParams,
    /// Most output tokens this engine produces, first token included (1 on prefill;
    /// `stop.max_tokens` on decode). `stop.min_tokens` is capped to it.
    pub max_output_tokens: u32,
    /// Where the prompt's KV comes from.
    pub kv: KvInput,
}

/// Per-request timing and usage, in the terminal event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestReport {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens, first token included.
    pub output_tokens: u32,
    /// Submission to the first step that scheduled it, wall seconds.
    pub queue_s: f64,
    /// First scheduled to the release of its last step, wall seconds (paced).
    pub compute_s: f64,
    /// Sum of the simulated durations of the steps it took part in, seconds.
    pub simulated_s: f64,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Cancelled (abort, client gone).
    Aborted,
    /// The executor or the engine failed.
    Internal,
    /// The engine stopped.
    ShutDown,
}

/// One event of a request's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// New tokens (at least one), in order; `finish` on the generation's last tokens.
    Tokens {
        /// Token ids.
        ids: Vec<u32>,
        /// One per id when the executor gave them (an arrived request's first token: the
        /// prefill instance's); the service shows them only when the client asked.
        logprobs: Option<Vec<TokenLogprob>>,
        /// Set on the last tokens of the generation.
        finish: Option<FinishReason>,
    },
    /// A `retain` request's generation ended; its KV blocks are held until
    /// [`EngineHandle::release_kv`] or a cancel. Not terminal.
    KvRetained(RequestReport),
    /// Terminal: the generation finished (and, for `retain`, the KV was released).
    Done(RequestReport),
    /// Terminal: the request failed.
    Failed {
        /// Classification.
        kind: FailureKind,
        /// Operator-facing detail.
        message: String,
    },
}

impl EngineEvent {
    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EngineEvent::Done(_) | EngineEvent::Failed { .. })
    }
}

/// A submission the engine refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// Too many requests queued.
    #[error("engine queue is full: {waiting} requests waiting (limit {limit})")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
        /// The limit.
        limit: usize,
    },
    /// The command queue is full.
    #[error("engine command queue is full")]
    Busy,
    /// The id is in use.
    #[error("request `{0}` is already in this engine")]
    Duplicate(String),
    /// The request is invalid for this engine (too long, bad stop conditions, KV mismatch).
    #[error("request `{id}` refused: {reason}")]
    Invalid {
        /// The request.
        id: String,
        /// Why.
        reason: String,
    },
    /// The engine stopped or broke.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

impl SubmitError {
    /// The client-facing error (429 for full queues, 400 for invalid or duplicate requests, 503
    /// when the engine is unavailable).
    pub fn to_api_error(&self) -> ApiError {
        let (kind, message, code) = match self {
            SubmitError::QueueFull { .. } | SubmitError::Busy => (
                ErrorKind::RateLimited,
                "the instance's queue is full; retry later",
                "queue_full",
            ),
            SubmitError::Duplicate(_) => (
                ErrorKind::InvalidRequest,
                "request_id is already in use on this instance",
                "duplicate_request_id",
            ),
            SubmitError::Invalid { reason, .. } => {
                return ApiError::invalid_request(reason.clone()).with_code("invalid_request");
            }
            SubmitError::Unavailable(_) => (
                ErrorKind::Unavailable,
                "the instance's engine is unavailable",
                "engine_unavailable",
            ),
        };
        ApiError::new(kind, message)
            .with_code(code)
            .with_diagnostic(self.to_string())
    }
}

/// A finished prefill's KV, read out of the latent store.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedKv {
    /// The prompt's latent KV.
    pub rows: KvRows,
    /// The MTP draft proposed after the first token, when the engine drafts.
    pub draft_token: Option<u32>,
    /// Simulated time to push it to a decode instance (the clock's `kv_transfer_ns`).
    pub transfer_simulated_ns: u64,
}

/// Why KV could not be exported.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExportError {
    /// No such request.
    #[error("request `{0}` is not in this engine")]
    Unknown(String),
    /// The request has not finished with retained KV.
    #[error("request `{0}` has no retained KV (not finished, or submitted without retain)")]
    NotRetained(String),
    /// Reading the store failed.
    #[error("reading request `{id}`'s KV: {source}")]
    Store {
        /// The request.
        id: String,
        /// The failure.
        source: KvError,
    },
    /// The engine stopped.
    #[error("engine stopped")]
    Gone,
}

/// The engine's state for stats and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineSnapshot {
    /// The engine's gauges and counters.
    pub stats: EngineStats,
    /// Prompt tokens waiting (queued requests' prompts, running requests' unprefilled rest).
    pub queued_prompt_tokens: u64,
    /// Steps paced.
    pub steps_paced: u64,
    /// Steps whose compute ended after their release time.
    pub late_steps: u64,
    /// Total lag, ns.
    pub lag_ns_total: u64,
    /// Total simulated step time, ns.
    pub simulated_ns_total: u64,
    /// Set once the engine broke (compute thread gone, scheduler bug).
    pub broken: Option<String>,
}

/// Fixed facts about an engine.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineInfo {
    /// The latent store's per-token shape.
    pub shape: LatentShape,
    /// The scheduler's configuration.
    pub scheduler: SchedulerConfig,
    /// Wall seconds per simulated second (0: no pacing).
    pub time_scale: f64,
    /// What the clock simulates.
    pub sim: Option<SimLabel>,
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The compute thread could not be started.
    #[error("starting the engine's compute thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub(crate) enum Command {
    Submit {
        submission: Box<Submission>,
        reply: oneshot::Sender<Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError>>,
    },
    Cancel {
        request_id: String,
        reply: Option<oneshot::Sender<bool>>,
    },
    Release {
        request_id: String,
        reply: oneshot::Sender<bool>,
    },
    Export {
        request_id: String,
        reply: oneshot::Sender<Result<ExportedKv, ExportError>>,
    },
    Snapshot {
        reply: oneshot::Sender<EngineSnapshot>,
    },
}

/// Cheap handle to an engine actor.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    info: Arc<EngineInfo>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Command::Submit { .. } => "Submit",
            Command::Cancel { .. } => "Cancel",
            Command::Release { .. } => "Release",
            Command::Export { .. } => "Export",
            Command::Snapshot { .. } => "Snapshot",
        };
        f.write_str(name)
    }
}

/// Starts an engine: its compute thread (owning `parts`) and its actor task (on the current
/// tokio runtime). The engine stops when the last handle (and every [`RequestStream`]) is
/// dropped.
pub fn spawn_engine<E, C>(
    config: &EngineConfig,
    parts: EngineParts<E, C>,
    metrics: EngineMetrics,
) -> Result<EngineHandle, SpawnError>
where
    E: Executor<SeqParams> + KvAccess + Send + 'static,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
{
    config.validate("engine")?;
    let scheduler = Scheduler::new(config.scheduler).map_err(|e| ConfigError {
        field: format!("engine.scheduler.{}", e.field),
        problem: e.problem,
    })?;
    let pacer = Pacer::new(config.time_scale).map_err(|e| ConfigError {
        field: "engine.time_scale".into(),
        problem: e.to_string(),
    })?;
    let info = Arc::new(EngineInfo {
        shape: parts.executor.latent_shape(),
        scheduler: config.scheduler,
        time_scale: config.time_scale,
        sim: parts.sim.clone(),
    });
    let eos_token_ids = parts.eos_token_ids.clone();
    let jobs = compute::spawn(parts).map_err(SpawnError::Thread)?;
    let (tx, rx) = mpsc::channel(config.command_queue_capacity);
    let actor = actor::Actor::new(actor::ActorSetup {
        scheduler,
        pacer,
        max_waiting: config.max_waiting_requests,
        eos_token_ids,
        jobs,
        metrics,
    });
    tokio::spawn(actor.run(rx));
    Ok(EngineHandle { tx, info })
}

impl EngineHandle {
    /// Fixed facts about the engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Queues a request; its events arrive on the returned stream.
    pub async fn submit(&self, submission: Submission) -> Result<RequestStream, SubmitError> {
        let request_id = submission.request_id.clone();
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Command::Submit {
                submission: Box::new(submission),
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Busy,
                mpsc::error::TrySendError::Closed(_) => {
                    SubmitError::Unavailable("engine stopped".into())
                }
            })?;
        let events = rx
            .await
            .map_err(|_| SubmitError::Unavailable("engine stopped".into()))??;
        Ok(RequestStream {
            request_id,
            events,
            handle: self.clone(),
            ended: false,
        })
    }

    /// Aborts a request wherever it is, freeing its blocks at once; `false` if unknown.
    pub async fn cancel(&self, request_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Cancel {
            request_id: request_id.to_string(),
            reply: Some(reply),
        };
        self.tx.send(cmd).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Frees a finished `retain` request's KV and ends its stream with `Done`; `false` if the
    /// request is unknown or holds no retained KV.
    pub async fn release_kv(&self, request_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Release {
            request_id: request_id.to_string(),
            reply,
        };
        self.tx.send(cmd).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Reads a finished `retain` request's KV (and prices its transfer).
    pub async fn export_kv(&self, request_id: &str) -> Result<ExportedKv, ExportError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Export {
            request_id: request_id.to_string(),
            reply,
        };
        self.tx.send(cmd).await.map_err(|_| ExportError::Gone)?;
        rx.await.map_err(|_| ExportError::Gone)?
    }

    /// The engine's current statistics; `None` when it stopped.
    pub async fn snapshot(&self) -> Option<EngineSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Cancels without waiting (from `Drop`).
    fn cancel_detached(&self, request_id: &str) {
        let cmd = Command::Cancel {
            request_id: request_id.to_string(),
            reply: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let tx = self.tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

/// The events of one request. Dropping it before the terminal event cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    request_id: String,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    handle: EngineHandle,
    ended: bool,
}

impl RequestStream {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(e) if !e.is_terminal() => {}
            _ => self.ended = true,
        }
        event.or_else(|| {
            Some(EngineEvent::Failed {
                kind: FailureKind::ShutDown,
                message: "the engine stopped before the request ended".into(),
            })
        })
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.ended {
            self.handle.cancel_detached(&self.request_id);
        }
    }
}

/// The engine key of a request id: FNV-1a of its bytes (the engine probes upwards on a
/// collision with a different live id). Stable, so a scripted executor's tokens for a request
/// are predictable in tests.
pub fn request_key(request_id: &str) -> RequestId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    RequestId(h)
}
