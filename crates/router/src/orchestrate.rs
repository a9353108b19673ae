//! Prefill/decode orchestration of one generation (one choice of one prompt).
//!
//! Per generation a task: chooses a decode instance D and opens its `/internal/decode` stream (D
//! registers the request before answering), then chooses a prefill instance P and sends
//! `/internal/prefill` with D's KV address, while relaying D's events to the consumer through a
//! channel. The task owns all I/O and every timer; the consumer (response building) only reads
//! [`GenEvent`]s from a [`GenerationHandle`].
//!
//! Invariants:
//! - opening D's stream is retried on another decode instance (`retries.decode_attempts`) when D
//!   cannot be reached;
//! - D has *committed* once its first `tokens` event arrived; before that a failed prefill leg
//!   (connect error, 5xx/429, protocol violation, timeout) is retried on another prefill instance,
//!   up to `retries.prefill_attempts` attempts in all; after it, prefill failures are moot;
//! - every stage has a deadline: prefill (per attempt), KV wait (enforced by D, `kv_timeout_ms`),
//!   first token, inter-token, total;
//! - on any failure, timeout, early stop or consumer loss, `/internal/abort` goes to every leg that
//!   has not finished (both sides), so no instance keeps KV for a dead request;
//! - the consumer sees `Started` before the first `Tokens`, and exactly one final event:
//!   `Finished` or `Failed` (none if it went away).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdserve_protocol::internal::{
    DecodeErrorKind, DecodeEvent, DecodeRequest, DecodeTarget, PrefillRequest, PrefillResponse,
    TokenLogprob,
};
use pdserve_protocol::openai::{FinishReason, GenerationReport, StageTimings};
use pdserve_protocol::params::{SamplingParams, StopParams};
use pdserve_protocol::{ApiError, ErrorKind};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

use crate::client::{DecodeEvents, InstanceClient, LegError};
use crate::config::{HealthConfig, RetryConfig, TimeoutConfig};
use crate::instances::{InflightGuard, Instance, Pool};
use crate::metrics::{RouterMetrics, catalog};
use crate::policy::RequestFeatures;

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerationSpec {
    /// Unique id (names the KV frame and both legs).
    pub request_id: String,
    /// Choice index in the response.
    pub index: u32,
    /// Router sequence number (policies' round-robin position and RNG stream).
    pub seq: u64,
    /// Prompt token ids.
    pub prompt: Arc<Vec<u32>>,
    /// Sampling of this choice.
    pub sampling: SamplingParams,
    /// Token-level stops.
    pub stop: StopParams,
    /// When the HTTP request arrived.
    pub arrival: Instant,
}

/// Where a generation runs, known once decode committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Prefill instance of the attempt in flight or done at commit time.
    pub prefill_instance: Option<Arc<str>>,
    /// Decode instance.
    pub decode_instance: Arc<str>,
    /// Prefill attempts so far.
    pub prefill_attempts: u32,
    /// Timings known at commit (router, first token, and prefill's if it answered already).
    pub timings: StageTimings,
}

/// How a generation ended, for usage and the `pdserve` extension.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutcome {
    /// Placement and timings.
    pub report: GenerationReport,
    /// Prompt tokens served from the prefill prefix cache.
    pub cached_tokens: u32,
}

/// What the consumer receives.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Decode committed; sent once, before the first tokens.
    Started(Placement),
    /// New tokens from decode.
    Tokens {
        /// Ids.
        ids: Vec<u32>,
        /// Parallel logprobs when requested.
        logprobs: Option<Vec<TokenLogprob>>,
        /// Set on the last tokens of the generation.
        finish_reason: Option<FinishReason>,
    },
    /// The generation ended (normally or by early stop).
    Finished(GenerationOutcome),
    /// The generation failed.
    Failed(ApiError),
}

/// The consumer's end of a generation.
#[derive(Debug)]
pub struct GenerationHandle {
    /// Choice index.
    pub index: u32,
    events: mpsc::Receiver<GenEvent>,
    stop: StopSignal,
}

impl GenerationHandle {
    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.events.recv().await
    }

    /// Ends the generation early (a stop string matched): both legs are aborted, and a `Finished`
    /// still follows. Tokens already in the channel may precede it.
    pub fn stop_early(&mut self) {
        self.stop.fire();
    }

    /// Splits into the event receiver and the early-stop signal (to merge several streams).
    pub fn into_parts(self) -> (mpsc::Receiver<GenEvent>, StopSignal) {
        (self.events, self.stop)
    }
}

/// Fires a generation's early stop (once; later calls do nothing).
#[derive(Debug)]
pub struct StopSignal(Option<oneshot::Sender<()>>);

impl StopSignal {
    /// Requests the early stop.
    pub fn fire(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Runs generations over the two pools.
#[derive(Debug)]
pub struct Orchestrator {
    /// Prefill instances and policy.
    pub prefill: Pool,
    /// Decode instances and policy.
    pub decode: Pool,
    /// Internal API client.
    pub client: InstanceClient,
    /// Stage timeouts.
    pub timeouts: TimeoutConfig,
    /// Retry budget.
    pub retries: RetryConfig,
    /// Health thresholds (request-leg failures count).
    pub health: HealthConfig,
    /// Metrics.
    pub metrics: Arc<RouterMetrics>,
    /// Seed of the policies' random choices.
    pub policy_seed: u64,
}

type PrefillFuture = Pin<Box<dyn Future<Output = Result<PrefillResponse, LegError>> + Send>>;

/// A prefill leg in flight.
struct PrefillAttempt {
    instance: Arc<Instance>,
    future: PrefillFuture,
    _inflight: InflightGuard,
}

/// Why a generation stopped before its natural end.
enum Interrupt {
    /// The consumer went away.
    Gone,
    /// An error to report.
    Failed(ApiError, &'static str),
}

/// The per-generation state of the drive loop.
struct Run<'a> {
    spec: &'a GenerationSpec,
    tx: &'a mpsc::Sender<GenEvent>,
    decode: Arc<Instance>,
    attempt: Option<PrefillAttempt>,
    attempts: u32,
    tried: Vec<Arc<str>>,
    prefill_done: Option<(Arc<str>, PrefillResponse)>,
    dispatch: Instant,
    router_s: f64,
    committed_at: Option<Instant>,
    last_event: Instant,
    decode_finished: bool,
    rng: StdRng,
}

fn seq_seed(seed: u64, seq: u64) -> u64 {
    // splitmix64 step: distinct, well-mixed streams per request.
    let mut z = seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn no_instance(role: &str) -> Interrupt {
    Interrupt::Failed(
        ApiError::new(
            ErrorKind::Unavailable,
            format!("no healthy {role} instance"),
        )
        .with_code("no_healthy_instance"),
        "no_instance",
    )
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Orchestrator {
    /// Starts a generation; events arrive on the returned handle.
    pub fn spawn(self: &Arc<Self>, spec: GenerationSpec) -> GenerationHandle {
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel();
        let index = spec.index;
        let this = self.clone();
        tokio::spawn(async move { this.run(spec, tx, stop_rx).await });
        GenerationHandle {
            index,
            events: rx,
            stop: StopSignal(Some(stop_tx)),
        }
    }

    async fn run(
        self: Arc<Self>,
        spec: GenerationSpec,
        tx: mpsc::Sender<GenEvent>,
        stop_rx: oneshot::Receiver<()>,
    ) {
        match self.drive(&spec, &tx, stop_rx).await {
            Ok(outcome) => {
                let _ = tx.send(GenEvent::Finished(outcome)).await;
            }
            Err(Interrupt::Gone) => self.metrics.generation_finished("abort"),
            Err(Interrupt::Failed(error, reason)) => {
                self.metrics.generation_finished("error");
                self.metrics
                    .counter(
                        &catalog::ROUTER_GENERATION_FAILURES_TOTAL,
                        &[("reason", reason)],
                    )
                    .increment(1);
                let _ = tx.send(GenEvent::Failed(error)).await;
            }
        }
    }

    fn record_decision(&self, pool: &Pool, instance: &Instance) {
        self.metrics
            .counter(
                &catalog::ROUTER_ROUTING_DECISIONS_TOTAL,
                &[
                    ("role", pool.role.as_str()),
                    ("instance", &instance.id),
                    ("policy", pool.policy_name()),
                ],
            )
            .increment(1);
    }

    /// Sends `/internal/abort` in the background.
    fn abort(&self, instance: &Arc<Instance>, request_id: &str, reason: &'static str) {
        self.metrics
            .counter(
                &catalog::ROUTER_ABORTS_TOTAL,
                &[("role", instance.role.as_str()), ("reason", reason)],
            )
            .increment(1);
        let client = self.client.clone();
        let instance = instance.clone();
        let request_id = request_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = client.abort(&instance, &request_id).await {
                tracing::debug!(%request_id, error = %e, "abort failed");
            }
        });
    }

    fn start_prefill(
        &self,
        run: &mut Run<'_>,
        instance: Arc<Instance>,
        kv_addr: &str,
    ) -> PrefillAttempt {
        self.record_decision(&self.prefill, &instance);
        run.tried.push(instance.id.clone());
        run.attempts += 1;
        let request = PrefillRequest {
            request_id: run.spec.request_id.clone(),
            prompt_token_ids: run.spec.prompt.as_ref().clone(),
            sampling: run.spec.sampling.clone(),
            stop: run.spec.stop.clone(),
            decode: DecodeTarget {
                instance_id: run.decode.id.to_string(),
                kv_addr: kv_addr.to_string(),
            },
        };
        let client = self.client.clone();
        let target = instance.clone();
        let timeout = Duration::from_millis(self.timeouts.prefill_ms);
        let inflight = instance.track(run.spec.prompt.len() as u64);
        PrefillAttempt {
            instance,
            future: Box::pin(async move { client.prefill(&target, &request, timeout).await }),
            _inflight: inflight,
        }
    }

    /// Chooses a decode instance and opens its stream, trying another instance (up to
    /// `retries.decode_attempts`) when one cannot be reached; nothing is committed yet, so this is
    /// safe. `Ok(None)` when the consumer went away.
    async fn open_decode(
        &self,
        spec: &GenerationSpec,
        tx: &mpsc::Sender<GenEvent>,
        features: &RequestFeatures<'_>,
        rng: &mut StdRng,
    ) -> Result<Option<(Arc<Instance>, String, DecodeEvents, InflightGuard)>, Interrupt> {
        let request = DecodeRequest {
            request_id: spec.request_id.clone(),
            prompt_token_ids: spec.prompt.as_ref().clone(),
            sampling: spec.sampling.clone(),
            stop: spec.stop.clone(),
            kv_timeout_ms: self.timeouts.kv_transfer_ms,
        };
        let timeout = Duration::from_millis(self.timeouts.decode_open_ms);
        let mut tried: Vec<Arc<str>> = Vec::new();
        loop {
            let chosen = self.decode.select(features, &tried, rng);
            let Some((decode, kv_addr)) = chosen.and_then(|d| d.kv_addr().map(|a| (d, a))) else {
                return Err(no_instance("decode"));
            };
            self.record_decision(&self.decode, &decode);
            tried.push(decode.id.clone());
            let inflight = decode.track(spec.prompt.len() as u64);
            let result = tokio::select! {
                r = self.client.open_decode(&decode, &request, timeout) => r,
                _ = tx.closed() => {
                    // The request may have been registered: release it.
                    self.abort(&decode, &spec.request_id, "client_disconnect");
                    return Ok(None);
                }
            };
            match result {
                Ok(events) => {
                    decode.leg_succeeded();
                    return Ok(Some((decode, kv_addr, events, inflight)));
                }
                Err(e) => {
                    // A timed-out open may have registered the request.
                    self.abort(&decode, &spec.request_id, "retry");
                    if !e.retryable() {
                        return Err(Interrupt::Failed(e.to_api_error("decode"), e.reason()));
                    }
                    decode.failed(&self.health);
                    if tried.len() >= self.retries.decode_attempts as usize {
                        return Err(Interrupt::Failed(e.to_api_error("decode"), e.reason()));
                    }
                    self.metrics
                        .counter(
                            &catalog::ROUTER_RETRIES_TOTAL,
                            &[("role", "decode"), ("reason", e.reason())],
                        )
                        .increment(1);
                    tracing::info!(request_id = %spec.request_id, from = %decode.id, error = %e, "retrying decode open");
                }
            }
        }
    }

    async fn drive(
        &self,
        spec: &GenerationSpec,
        tx: &mpsc::Sender<GenEvent>,
        mut stop_rx: oneshot::Receiver<()>,
    ) -> Result<GenerationOutcome, Interrupt> {
        let features = RequestFeatures {
            seq: spec.seq,
            prompt_token_ids: &spec.prompt,
        };
        let mut rng = StdRng::seed_from_u64(seq_seed(self.policy_seed, spec.seq));
        let dispatch = Instant::now();
        let router_s = secs(dispatch - spec.arrival);
        self.metrics
            .observe(&catalog::ROUTER_OVERHEAD_SECONDS, router_s);
        let Some((decode, kv_addr, mut events, _decode_inflight)) =
            self.open_decode(spec, tx, &features, &mut rng).await?
        else {
            return Err(Interrupt::Gone);
        };

        let mut run = Run {
            spec,
            tx,
            decode,
            attempt: None,
            attempts: 0,
            tried: Vec::new(),
            prefill_done: None,
            dispatch,
            router_s,
            committed_at: None,
            last_event: dispatch,
            decode_finished: false,
            rng,
        };
        let result = match self.prefill.select(&features, &[], &mut run.rng) {
            None => Err(no_instance("prefill")),
            Some(p) => {
                run.attempt = Some(self.start_prefill(&mut run, p, &kv_addr));
                self.pump(&mut run, &mut events, &mut stop_rx, &kv_addr)
                    .await
            }
        };
        let reason = match &result {
            Ok(()) => "stop_string",
            Err(Interrupt::Gone) => "client_disconnect",
            Err(Interrupt::Failed(..)) => "failure",
        };
        if !run.decode_finished {
            self.abort(&run.decode, &spec.request_id, reason);
        }
        if let Some(a) = run.attempt.take() {
            self.abort(&a.instance, &spec.request_id, reason);
        }
        result?;
        Ok(self.outcome(&run))
    }

    /// The event loop: relays decode events, handles prefill results and retries, enforces
    /// deadlines. Returns when decode is done and no prefill leg is pending, or on early stop.
    async fn pump(
        &self,
        run: &mut Run<'_>,
        events: &mut DecodeEvents,
        stop_rx: &mut oneshot::Receiver<()>,
        kv_addr: &str,
    ) -> Result<(), Interrupt> {
        let total_deadline = run.spec.arrival + Duration::from_millis(self.timeouts.total_ms);
        loop {
            if run.decode_finished && run.attempt.is_none() {
                return Ok(());
            }
            let (stage_deadline, stage) = match run.committed_at {
                _ if run.decode_finished => (total_deadline, "total"),
                None => (
                    run.dispatch + Duration::from_millis(self.timeouts.first_token_ms),
                    "first_token",
                ),
                Some(_) => (
                    run.last_event + Duration::from_millis(self.timeouts.inter_token_ms),
                    "inter_token",
                ),
            };
            let (deadline, stage) = if total_deadline < stage_deadline {
                (total_deadline, "total")
            } else {
                (stage_deadline, stage)
            };
            let decode_open = !run.decode_finished;
            tokio::select! {
                biased;
                r = &mut *stop_rx => {
                    match r {
                        Ok(()) => return Ok(()),
                        Err(_) => return Err(Interrupt::Gone),
                    }
                }
                _ = run.tx.closed() => return Err(Interrupt::Gone),
                ev = events.next(), if decode_open => self.on_decode_event(run, ev).await?,
                r = poll_attempt(&mut run.attempt) => self.on_prefill_result(run, r, kv_addr)?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.metrics.counter(&catalog::ROUTER_STAGE_TIMEOUTS_TOTAL, &[("stage", stage)]).increment(1);
                    let message = match stage {
                        "first_token" => "timed out waiting for the first token",
                        "inter_token" => "timed out waiting for the next token",
                        _ => "the request exceeded its total time limit",
                    };
                    return Err(Interrupt::Failed(
                        ApiError::new(ErrorKind::Timeout, message)
                            .with_code(format!("{stage}_timeout"))
                            .with_diagnostic(format!("request {} stage {stage}", run.spec.request_id)),
                        "timeout",
                    ));
                }
            }
        }
    }

    async fn on_decode_event(
        &self,
        run: &mut Run<'_>,
        event: Option<Result<DecodeEvent, LegError>>,
    ) -> Result<(), Interrupt> {
        let protocol_failure = |detail: String| {
            Interrupt::Failed(
                ApiError::internal(detail).with_code("decode_failed"),
                "protocol",
            )
        };
        match event {
            None => {
                // Not marked finished: the instance may still hold the request, so it is aborted.
                Err(protocol_failure(format!(
                    "decode stream of {} ended without done or error",
                    run.spec.request_id
                )))
            }
            Some(Err(e)) => {
                run.decode.failed(&self.health);
                Err(Interrupt::Failed(e.to_api_error("decode"), e.reason()))
            }
            Some(Ok(DecodeEvent::Tokens {
                ids,
                logprobs,
                finish_reason,
            })) => {
                if ids.is_empty() || logprobs.as_ref().is_some_and(|l| l.len() != ids.len()) {
                    return Err(protocol_failure(format!(
                        "decode sent {} ids with {:?} logprobs",
                        ids.len(),
                        logprobs.as_ref().map(Vec::len)
                    )));
                }
                let now = Instant::now();
                if run.committed_at.is_none() {
                    run.committed_at = Some(now);
                    let ttft = secs(now - run.spec.arrival);
                    self.metrics
                        .observe(&catalog::ROUTER_TIME_TO_FIRST_TOKEN_SECONDS, ttft);
                    let placement = Placement {
                        prefill_instance: run
                            .prefill_done
                            .as_ref()
                            .map(|(id, _)| id.clone())
                            .or_else(|| run.attempt.as_ref().map(|a| a.instance.id.clone())),
                        decode_instance: run.decode.id.clone(),
                        prefill_attempts: run.attempts,
                        timings: self.timings(run, None),
                    };
                    Self::send(run.tx, GenEvent::Started(placement)).await?;
                } else {
                    let per_token = secs(now - run.last_event) / ids.len() as f64;
                    let h = self
                        .metrics
                        .histogram(&catalog::ROUTER_INTER_TOKEN_LATENCY_SECONDS, &[]);
                    for _ in 0..ids.len() {
                        h.record(per_token);
                    }
                }
                run.last_event = now;
                Self::send(
                    run.tx,
                    GenEvent::Tokens {
                        ids,
                        logprobs,
                        finish_reason,
                    },
                )
                .await
            }
            Some(Ok(DecodeEvent::Done { .. })) => {
                run.decode_finished = true;
                run.decode.leg_succeeded();
                run.last_event = Instant::now();
                if run.committed_at.is_none() {
                    return Err(protocol_failure(
                        "decode finished without tokens".to_string(),
                    ));
                }
                Ok(())
            }
            Some(Ok(DecodeEvent::Error { kind, message })) => {
                run.decode_finished = true;
                let (error_kind, client_message, reason) = match kind {
                    DecodeErrorKind::KvTimeout => (
                        ErrorKind::Timeout,
                        "timed out waiting for the KV transfer",
                        "kv_timeout",
                    ),
                    DecodeErrorKind::Overloaded => (
                        ErrorKind::Unavailable,
                        "the decode instance is overloaded; try again",
                        "overloaded",
                    ),
                    DecodeErrorKind::KvInvalid => {
                        (ErrorKind::Internal, "the KV transfer failed", "kv_invalid")
                    }
                    DecodeErrorKind::Aborted => {
                        (ErrorKind::Internal, "the generation was aborted", "aborted")
                    }
                    DecodeErrorKind::Internal | DecodeErrorKind::Unknown => (
                        ErrorKind::Internal,
                        "the decode stage failed",
                        "decode_error",
                    ),
                };
                if kind == DecodeErrorKind::KvTimeout {
                    self.metrics
                        .counter(
                            &catalog::ROUTER_STAGE_TIMEOUTS_TOTAL,
                            &[("stage", "kv_transfer")],
                        )
                        .increment(1);
                }
                Err(Interrupt::Failed(
                    ApiError::new(error_kind, client_message)
                        .with_code(reason)
                        .with_diagnostic(format!("decode {}: {kind:?}: {message}", run.decode.id)),
                    reason,
                ))
            }
        }
    }

    fn on_prefill_result(
        &self,
        run: &mut Run<'_>,
        result: Result<PrefillResponse, LegError>,
        kv_addr: &str,
    ) -> Result<(), Interrupt> {
        let Some(attempt) = run.attempt.take() else {
            return Ok(());
        };
        match result {
            Ok(response) => {
                attempt.instance.leg_succeeded();
                let t = &response.timings;
                self.metrics
                    .observe(&catalog::ROUTER_REQUEST_QUEUE_TIME_SECONDS, t.queue_s);
                self.metrics
                    .observe(&catalog::ROUTER_REQUEST_PREFILL_TIME_SECONDS, t.prefill_s);
                self.metrics
                    .observe(&catalog::ROUTER_KV_TRANSFER_TIME_SECONDS, t.transfer_s);
                run.prefill_done = Some((attempt.instance.id.clone(), response));
                Ok(())
            }
            Err(e) => {
                if e.retryable() {
                    attempt.instance.failed(&self.health);
                }
                if run.committed_at.is_some() || run.decode_finished {
                    // Decode already has the KV: the lost answer only costs us prefill timings.
                    tracing::debug!(request_id = %run.spec.request_id, error = %e, "prefill answer lost after commit");
                    return Ok(());
                }
                // The failed instance may still hold the request (e.g. after a timeout).
                self.abort(&attempt.instance, &run.spec.request_id, "retry");
                if !e.retryable() || run.attempts >= self.retries.prefill_attempts {
                    return Err(Interrupt::Failed(e.to_api_error("prefill"), e.reason()));
                }
                let features = RequestFeatures {
                    seq: run.spec.seq,
                    prompt_token_ids: &run.spec.prompt,
                };
                let tried = run.tried.clone();
                let Some(next) = self.prefill.select(&features, &tried, &mut run.rng) else {
                    return Err(Interrupt::Failed(e.to_api_error("prefill"), e.reason()));
                };
                self.metrics
                    .counter(
                        &catalog::ROUTER_RETRIES_TOTAL,
                        &[("role", "prefill"), ("reason", e.reason())],
                    )
                    .increment(1);
                tracing::info!(request_id = %run.spec.request_id, from = %attempt.instance.id, to = %next.id, error = %e, "retrying prefill");
                run.attempt = Some(self.start_prefill(run, next, kv_addr));
                Ok(())
            }
        }
    }

    async fn send(tx: &mpsc::Sender<GenEvent>, event: GenEvent) -> Result<(), Interrupt> {
        tx.send(event).await.map_err(|_| Interrupt::Gone)
    }

    fn timings(&self, run: &Run<'_>, end: Option<Instant>) -> StageTimings {
        let prefill = run.prefill_done.as_ref().map(|(_, r)| &r.timings);
        let first = run.committed_at;
        StageTimings {
            router_s: run.router_s,
            queue_s: prefill.map(|t| t.queue_s),
            prefill_s: prefill.map(|t| t.prefill_s),
            transfer_s: prefill.map(|t| t.transfer_s),
            simulated_prefill_s: prefill.map(|t| t.simulated_prefill_s),
            first_token_s: first.map(|f| secs(f - run.spec.arrival)),
            decode_s: first.zip(end).map(|(f, e)| secs(e - f)),
            e2e_s: end.map(|e| secs(e - run.spec.arrival)),
        }
    }

    fn outcome(&self, run: &Run<'_>) -> GenerationOutcome {
        let end = Instant::now();
        let timings = self.timings(run, Some(end));
        if let Some(e2e) = timings.e2e_s {
            self.metrics
                .observe(&catalog::ROUTER_E2E_REQUEST_LATENCY_SECONDS, e2e);
        }
        if let Some(d) = timings.decode_s {
            self.metrics
                .observe(&catalog::ROUTER_REQUEST_DECODE_TIME_SECONDS, d);
        }
        GenerationOutcome {
            report: GenerationReport {
                index: run.spec.index,
                prefill_instance: run.prefill_done.as_ref().map(|(id, _)| id.to_string()),
                decode_instance: run.decode.id.to_string(),
                prefill_attempts: run.attempts,
                timings,
            },
            cached_tokens: run
                .prefill_done
                .as_ref()
                .map_or(0, |(_, r)| r.cached_tokens),
        }
    }
}

async fn poll_attempt(attempt: &mut Option<PrefillAttempt>) -> Result<PrefillResponse, LegError> {
    match attempt {
        Some(a) => a.future.as_mut().await,
        None => std::future::pending().await,
    }
}
