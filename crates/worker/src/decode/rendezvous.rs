//! Pairs decode requests with their KV frames, in either order, and admits each pair into the
//! engine. One task owns the pending table; the HTTP handlers and the KV receiver hold a cheap
//! [`RendezvousHandle`].
//!
//! Per request id, at most one slot: `Waiting` (the decode request registered, no frame yet) or
//! `Staged` (a valid frame arrived, no request yet). Invariants:
//! - a `Waiting` request ends exactly once: admitted, `kv_timeout` after its `kv_timeout_ms`,
//!   `kv_invalid` when its frame fails, or `aborted`;
//! - a `Staged` frame is dropped (its memory freed) when claimed, aborted, or after
//!   `kv_orphan_timeout_ms`; staged frames never exceed `max_staged_kv_bytes`, and waiting plus
//!   staged slots never exceed `max_pending_requests`;
//! - ids that were admitted, timed out or aborted are remembered (bounded), so a late or
//!   duplicate frame is answered `unwanted` instead of being staged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use pdserve_protocol::internal::{DecodeErrorKind, DecodeEvent, DecodeRequest};
use pdserve_protocol::params::SamplingParams;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::sync::{mpsc, oneshot};

use crate::backend::SeqParams;
use crate::engine::{EngineHandle, KvInput, PrefilledKv, RequestStream, Submission, SubmitError};
use crate::kv::{IncomingKv, KvAck};

/// Ids remembered after they ended.
const TOMBSTONES: usize = 8192;

/// A registered request's outcome: admitted with its engine stream, or the error event that
/// ends its decode stream.
pub(crate) type Admission = Result<Admitted, DecodeEvent>;

/// An admitted request.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) stream: RequestStream,
    /// Registration to KV paired, seconds (0 when the frame came first).
    pub(crate) kv_wait_s: f64,
}

/// Limits of the rendezvous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RendezvousLimits {
    pub(crate) max_pending: usize,
    pub(crate) max_staged_bytes: u64,
    pub(crate) orphan_timeout: Duration,
}

/// Metric handles the rendezvous updates.
#[derive(Clone, Debug)]
pub(crate) struct RendezvousMetrics {
    pub(crate) kv_wait: Histogram,
    pub(crate) timeouts: Counter,
    pub(crate) orphans_expired: Counter,
    pub(crate) waiting: Gauge,
    pub(crate) staged: Gauge,
}

/// Pending work the engine does not see yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PendingCounts {
    pub(crate) waiting: usize,
    pub(crate) staged: usize,
    pub(crate) waiting_prompt_tokens: u64,
    pub(crate) staged_bytes: u64,
}

enum Command {
    Register {
        request: DecodeRequest,
        reply: oneshot::Sender<Result<oneshot::Receiver<Admission>, ApiError>>,
    },
    Frame {
        kv: Box<IncomingKv>,
        reply: oneshot::Sender<KvAck>,
    },
    FrameFailed {
        request_id: String,
        message: String,
    },
    Abort {
        request_id: String,
        reply: oneshot::Sender<bool>,
    },
    Expire {
        request_id: String,
        token: u64,
    },
    Counts {
        reply: oneshot::Sender<PendingCounts>,
    },
}

/// Cheap handle to the rendezvous task.
#[derive(Clone, Debug)]
pub(crate) struct RendezvousHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rendezvous::Command")
    }
}

fn gone() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the decode instance is shutting down",
    )
    .with_code("shutting_down")
}

impl RendezvousHandle {
    /// Starts the task.
    pub(crate) fn spawn(
        engine: EngineHandle,
        limits: RendezvousLimits,
        metrics: RendezvousMetrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let task = Rendezvous {
            engine,
            limits,
            metrics,
            slots: HashMap::new(),
            tombstones: VecDeque::new(),
            tombstone_set: HashSet::new(),
            next_token: 0,
            staged_bytes: 0,
            timers: tx.downgrade(),
        };
        tokio::spawn(task.run(rx));
        Self { tx }
    }

    /// Registers a decode request; resolves when its KV is paired (or it fails).
    pub(crate) async fn register(
        &self,
        request: DecodeRequest,
    ) -> Result<oneshot::Receiver<Admission>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Register { request, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Offers a valid frame.
    pub(crate) async fn frame(&self, kv: IncomingKv) -> KvAck {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Frame {
            kv: Box::new(kv),
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return KvAck::Overloaded;
        }
        rx.await.unwrap_or(KvAck::Overloaded)
    }

    /// Reports a frame for `request_id` that failed validation or broke off.
    pub(crate) async fn frame_failed(&self, request_id: String, message: String) {
        let _ = self
            .tx
            .send(Command::FrameFailed {
                request_id,
                message,
            })
            .await;
    }

    /// Drops whatever is pending for `request_id`; whether anything was.
    pub(crate) async fn abort(&self, request_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Abort {
            request_id: request_id.to_string(),
            reply,
        };
        self.tx.send(cmd).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Pending counts for stats.
    pub(crate) async fn counts(&self) -> PendingCounts {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Counts { reply }).await.is_err() {
            return PendingCounts::default();
        }
        rx.await.unwrap_or_default()
    }
}

enum Slot {
    Waiting {
        request: DecodeRequest,
        admit: oneshot::Sender<Admission>,
        registered: Instant,
        token: u64,
    },
    Staged {
        kv: Box<IncomingKv>,
        token: u64,
    },
}

struct Rendezvous {
    engine: EngineHandle,
    limits: RendezvousLimits,
    metrics: RendezvousMetrics,
    slots: HashMap<String, Slot>,
    tombstones: VecDeque<String>,
    tombstone_set: HashSet<String>,
    next_token: u64,
    staged_bytes: u64,
    timers: mpsc::WeakSender<Command>,
}

fn error_event(kind: DecodeErrorKind, message: impl Into<String>) -> DecodeEvent {
    DecodeEvent::Error {
        kind,
        message: message.into(),
    }
}

impl Rendezvous {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Register { request, reply } => {
                    let _ = reply.send(self.register(request));
                }
                Command::Frame { kv, reply } => {
                    let _ = reply.send(self.frame(kv));
                }
                Command::FrameFailed {
                    request_id,
                    message,
                } => self.frame_failed(&request_id, message),
                Command::Abort { request_id, reply } => {
                    let _ = reply.send(self.abort(&request_id));
                }
                Command::Expire { request_id, token } => self.expire(&request_id, token),
                Command::Counts { reply } => {
                    let _ = reply.send(self.counts());
                }
            }
            let counts = self.counts();
            self.metrics.waiting.set(counts.waiting as f64);
            self.metrics.staged.set(counts.staged as f64);
        }
        // Shutting down: fail whoever still waits.
        for (_, slot) in self.slots.drain() {
            if let Slot::Waiting { admit, .. } = slot {
                let _ = admit.send(Err(error_event(
                    DecodeErrorKind::Internal,
                    "the decode instance shut down before the KV arrived",
                )));
            }
        }
    }

    fn counts(&self) -> PendingCounts {
        let mut c = PendingCounts {
            staged_bytes: self.staged_bytes,
            ..PendingCounts::default()
        };
        for slot in self.slots.values() {
            match slot {
                Slot::Waiting { request, .. } => {
                    c.waiting += 1;
                    c.waiting_prompt_tokens += request.prompt_token_ids.len() as u64;
                }
                Slot::Staged { .. } => c.staged += 1,
            }
        }
        c
    }

    fn register(
        &mut self,
        request: DecodeRequest,
    ) -> Result<oneshot::Receiver<Admission>, ApiError> {
        let id = request.request_id.clone();
        let duplicate = || {
            ApiError::invalid_param(
                "request_id",
                "request_id is already in use on this instance",
            )
            .with_code("duplicate_request_id")
        };
        if self.tombstone_set.contains(&id) {
            return Err(duplicate());
        }
        let (admit, rx) = oneshot::channel();
        match self.take(&id) {
            Some(Slot::Staged { kv, .. }) => {
                self.admit(request, *kv, 0.0, admit);
                return Ok(rx);
            }
            Some(waiting @ Slot::Waiting { .. }) => {
                self.slots.insert(id, waiting);
                return Err(duplicate());
            }
            None => {}
        }
        if self.slots.len() >= self.limits.max_pending {
            return Err(ApiError::new(
                ErrorKind::RateLimited,
                "the decode instance has too many requests waiting for KV; retry later",
            )
            .with_code("queue_full"));
        }
        let token = self.timer(&id, Duration::from_millis(request.kv_timeout_ms));
        self.slots.insert(
            id,
            Slot::Waiting {
                request,
                admit,
                registered: Instant::now(),
                token,
            },
        );
        Ok(rx)
    }

    fn frame(&mut self, kv: Box<IncomingKv>) -> KvAck {
        let id = kv.header.request_id.clone();
        if self.tombstone_set.contains(&id) {
            return KvAck::Unwanted;
        }
        match self.take(&id) {
            Some(Slot::Waiting {
                request,
                admit,
                registered,
                ..
            }) => {
                if admit.is_closed() {
                    // The decode stream's client is gone.
                    self.tombstone(id);
                    return KvAck::Unwanted;
                }
                self.admit(request, *kv, registered.elapsed().as_secs_f64(), admit);
                KvAck::Accepted
            }
            Some(staged @ Slot::Staged { .. }) => {
                self.put_back(id, staged);
                KvAck::Unwanted
            }
            None => {
                let size = kv.rows.size_bytes() as u64;
                if self.slots.len() >= self.limits.max_pending
                    || self.staged_bytes.saturating_add(size) > self.limits.max_staged_bytes
                {
                    return KvAck::Overloaded;
                }
                let token = self.timer(&id, self.limits.orphan_timeout);
                self.staged_bytes += size;
                self.slots.insert(id, Slot::Staged { kv, token });
                KvAck::Accepted
            }
        }
    }

    fn frame_failed(&mut self, id: &str, message: String) {
        match self.take(id) {
            Some(Slot::Waiting { admit, .. }) => {
                self.tombstone(id.to_string());
                let _ = admit.send(Err(error_event(DecodeErrorKind::KvInvalid, message)));
            }
            // A valid frame is already staged, or nobody waits: nothing to fail.
            Some(staged) => self.put_back(id.to_string(), staged),
            None => {}
        }
    }

    fn abort(&mut self, id: &str) -> bool {
        let found = match self.take(id) {
            Some(Slot::Waiting { admit, .. }) => {
                let _ = admit.send(Err(error_event(
                    DecodeErrorKind::Aborted,
                    "the request was aborted before its KV arrived",
                )));
                true
            }
            Some(Slot::Staged { .. }) => true,
            None => false,
        };
        self.tombstone(id.to_string());
        found
    }

    fn expire(&mut self, id: &str, token: u64) {
        let current = match self.slots.get(id) {
            Some(Slot::Waiting { token: t, .. } | Slot::Staged { token: t, .. }) => *t,
            None => return,
        };
        if current != token {
            return;
        }
        match self.take(id) {
            Some(Slot::Waiting {
                admit, registered, ..
            }) => {
                self.metrics.timeouts.increment(1);
                let waited_ms = registered.elapsed().as_millis();
                let _ = admit.send(Err(error_event(
                    DecodeErrorKind::KvTimeout,
                    format!("no KV frame arrived within {waited_ms} ms of registration"),
                )));
                self.tombstone(id.to_string());
            }
            Some(Slot::Staged { .. }) => {
                self.metrics.orphans_expired.increment(1);
                tracing::debug!(request_id = id, "dropped a KV frame no request claimed");
            }
            None => {}
        }
    }

    /// Removes a slot, keeping the staged-bytes count.
    fn take(&mut self, id: &str) -> Option<Slot> {
        let slot = self.slots.remove(id)?;
        if let Slot::Staged { kv, .. } = &slot {
            self.staged_bytes = self
                .staged_bytes
                .saturating_sub(kv.rows.size_bytes() as u64);
        }
        Some(slot)
    }

    fn put_back(&mut self, id: String, slot: Slot) {
        if let Slot::Staged { kv, .. } = &slot {
            self.staged_bytes += kv.rows.size_bytes() as u64;
        }
        self.slots.insert(id, slot);
    }

    fn tombstone(&mut self, id: String) {
        if self.tombstone_set.insert(id.clone()) {
            self.tombstones.push_back(id);
            if self.tombstones.len() > TOMBSTONES
                && let Some(old) = self.tombstones.pop_front()
            {
                self.tombstone_set.remove(&old);
            }
        }
    }

    /// Arms an expiry for `id` after `after`; returns its token.
    fn timer(&mut self, id: &str, after: Duration) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        let timers = self.timers.clone();
        let request_id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(tx) = timers.upgrade() {
                let _ = tx.send(Command::Expire { request_id, token }).await;
            }
        });
        token
    }

    /// Submits a paired request to the engine (off this task) and answers its decode stream.
    fn admit(
        &mut self,
        request: DecodeRequest,
        kv: IncomingKv,
        kv_wait_s: f64,
        admit: oneshot::Sender<Admission>,
    ) {
        self.tombstone(request.request_id.clone());
        self.metrics.kv_wait.record(kv_wait_s);
        let prompt_tokens = request.prompt_token_ids.len();
        if kv.rows.tokens != prompt_tokens {
            let _ = admit.send(Err(error_event(
                DecodeErrorKind::KvInvalid,
                format!(
                    "the KV frame holds {} tokens but the prompt has {prompt_tokens}",
                    kv.rows.tokens
                ),
            )));
            return;
        }
        if kv.header.sampled_tokens != 1 {
            let _ = admit.send(Err(error_event(
                DecodeErrorKind::KvInvalid,
                format!(
                    "the KV frame says {} tokens were sampled; decode continues after exactly 1",
                    kv.header.sampled_tokens
                ),
            )));
            return;
        }
        let sampling = SamplingParams {
            seed: kv.header.seed.or(request.sampling.seed),
            ..request.sampling
        };
        let submission = Submission {
            request_id: request.request_id,
            prompt: request.prompt_token_ids,
            max_output_tokens: request.stop.max_tokens,
            params: SeqParams {
                sampling,
                stop: request.stop,
            },
            kv: KvInput::Arrived(PrefilledKv {
                first_token: kv.header.first_token,
                draft_token: kv.header.draft_token,
                rows: kv.rows,
            }),
        };
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let admission = match engine.submit(submission).await {
                Ok(stream) => Ok(Admitted { stream, kv_wait_s }),
                Err(e) => {
                    let kind = match e {
                        SubmitError::QueueFull { .. } | SubmitError::Busy => {
                            DecodeErrorKind::Overloaded
                        }
                        _ => DecodeErrorKind::Internal,
                    };
                    Err(error_event(kind, e.to_string()))
                }
            };
            // If the decode stream is gone, the returned stream is dropped here, which cancels
            // the request and frees its blocks.
            let _ = admit.send(admission);
        });
    }
}
