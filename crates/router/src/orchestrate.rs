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
//! - D has *committed* once its first `tokens` event arrived (the client receives tokens only from
//!   D's stream, the prefill-sampled first token included, so nothing reached the client before);
//!   before that a failed prefill leg (connect error, 5xx/429, protocol violation, timeout) is
//!   retried on another prefill instance, up to `retries.prefill_attempts` attempts in all; after
//!   it, prefill failures are moot;
//! - a KV failure reported by D before it committed (`kv_invalid`, `kv_timeout`: the prefill leg
//!   died or stalled while pushing the KV) fails the whole pair: D's registration is aborted and a
//!   fresh one (same or another instance, per the policy) and a prefill attempt on another
//!   instance start; it draws on the same prefill budget and stage deadlines. The legs of the n-th
//!   pair (n ≥ 2) carry the id `<request_id>.<n>`, since a decode instance refuses an id it has
//!   seen before (and a late frame of the failed pair must not feed the new one). After commit
//!   every failure goes to the client;
//! - a prefill and a decode instance whose reported KV layer counts differ
//!   ([`crate::compat`]) are never paired; a request that no usable pair can serve fails with 503
//!   `kv_layout_mismatch` naming both instances and their values;
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
};
use pdserve_protocol::openai::{GenerationReport, StageTimings};
use pdserve_protocol::{ApiError, ErrorKind};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

use crate::client::{DecodeEvents, InstanceClient, LegError};
use crate::compat::{self, PairMismatch};
use crate::config::{HealthConfig, RetryConfig, TimeoutConfig};
use crate::instances::{InflightGuard, Instance, Pool};
use crate::metrics::{RouterMetrics, catalog};
use crate::policy::RequestFeatures;

pub use crate::generation::{
    GenEvent, GenerationHandle, GenerationOutcome, GenerationSpec, Placement, StopSignal,
};

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
    /// Decode reported a KV failure before it committed: the pair may be retried; the error and
    /// reason are what the client gets when it is not.
    PairFailed(ApiError, &'static str),
}

/// The decode leg of the pair in flight.
struct DecodeLeg {
    kv_addr: String,
    events: DecodeEvents,
    _inflight: InflightGuard,
}

/// The outcome of opening a decode leg.
type Opened = Option<(Arc<Instance>, DecodeLeg)>;

/// The per-generation state of the drive loop.
struct Run<'a> {
    spec: &'a GenerationSpec,
    /// The id of the current pair's legs (`spec.request_id`, then `<request_id>.<n>`).
    leg_id: String,
    /// Pairs started so far.
    pairs: u32,
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

fn mismatch_failure(mismatches: &[PairMismatch]) -> Interrupt {
    Interrupt::Failed(compat::unusable_error(mismatches), "kv_layout_mismatch")
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
            Err(Interrupt::Failed(error, reason) | Interrupt::PairFailed(error, reason)) => {
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

    /// Chooses a prefill instance for `decode`, skipping `tried` and instances whose KV layout
    /// does not match `decode`'s.
    fn select_prefill(
        &self,
        features: &RequestFeatures<'_>,
        decode: &Instance,
        tried: &[Arc<str>],
        rng: &mut StdRng,
    ) -> Result<Arc<Instance>, Interrupt> {
        let mismatches = compat::incompatible_prefills(&self.prefill, decode);
        let mut exclude = tried.to_vec();
        exclude.extend(mismatches.iter().map(|m| m.prefill.clone()));
        match self.prefill.select(features, &exclude, rng) {
            Some(p) => Ok(p),
            None if !mismatches.is_empty() => Err(mismatch_failure(&mismatches)),
            None => Err(no_instance("prefill")),
        }
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
            request_id: run.leg_id.clone(),
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
        leg_id: &str,
        tx: &mpsc::Sender<GenEvent>,
        features: &RequestFeatures<'_>,
        rng: &mut StdRng,
    ) -> Result<Opened, Interrupt> {
        let request = DecodeRequest {
            request_id: leg_id.to_string(),
            prompt_token_ids: spec.prompt.as_ref().clone(),
            sampling: spec.sampling.clone(),
            stop: spec.stop.clone(),
            kv_timeout_ms: self.timeouts.kv_transfer_ms,
        };
        let timeout = Duration::from_millis(self.timeouts.decode_open_ms);
        let mut tried: Vec<Arc<str>> = Vec::new();
        // Decode instances that no healthy prefill instance can feed (KV layout mismatch).
        let unpaired = compat::unpaired_decodes(&self.prefill, &self.decode);
        let mut exclude: Vec<Arc<str>> = unpaired.iter().map(|(d, _)| d.clone()).collect();
        loop {
            let chosen = self.decode.select(features, &exclude, rng);
            let Some((decode, kv_addr)) = chosen.and_then(|d| d.kv_addr().map(|a| (d, a))) else {
                if !unpaired.is_empty() {
                    let all: Vec<PairMismatch> =
                        unpaired.into_iter().flat_map(|(_, m)| m).collect();
                    return Err(mismatch_failure(&all));
                }
                return Err(no_instance("decode"));
            };
            self.record_decision(&self.decode, &decode);
            tried.push(decode.id.clone());
            exclude.push(decode.id.clone());
            let inflight = decode.track(spec.prompt.len() as u64);
            let result = tokio::select! {
                r = self.client.open_decode(&decode, &request, timeout) => r,
                _ = tx.closed() => {
                    // The request may have been registered: release it.
                    self.abort(&decode, leg_id, "client_disconnect");
                    return Ok(None);
                }
            };
            match result {
                Ok(events) => {
                    decode.leg_succeeded();
                    let leg = DecodeLeg {
                        kv_addr,
                        events,
                        _inflight: inflight,
                    };
                    return Ok(Some((decode, leg)));
                }
                Err(e) => {
                    // A timed-out open may have registered the request.
                    self.abort(&decode, leg_id, "retry");
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
                    tracing::info!(request_id = %leg_id, from = %decode.id, error = %e, "retrying decode open");
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
        let Some((decode, mut leg)) = self
            .open_decode(spec, &spec.request_id, tx, &features, &mut rng)
            .await?
        else {
            return Err(Interrupt::Gone);
        };

        let mut run = Run {
            spec,
            leg_id: spec.request_id.clone(),
            pairs: 1,
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
        let mut next = self.select_prefill(&features, &run.decode, &[], &mut run.rng);
        let result = loop {
            let p = match next {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            run.attempt = Some(self.start_prefill(&mut run, p, &leg.kv_addr));
            let (error, reason) = match self
                .pump(&mut run, &mut leg.events, &mut stop_rx, &leg.kv_addr)
                .await
            {
                Err(Interrupt::PairFailed(error, reason)) => (error, reason),
                other => break other,
            };
            match self
                .retry_pair(&mut run, &features, tx, error, reason)
                .await
            {
                Ok((p, new_leg)) => {
                    leg = new_leg;
                    next = Ok(p);
                }
                Err(e) => break Err(e),
            }
        };
        let reason = match &result {
            Ok(()) => "stop_string",
            Err(Interrupt::Gone) => "client_disconnect",
            Err(Interrupt::Failed(..) | Interrupt::PairFailed(..)) => "failure",
        };
        if !run.decode_finished {
            self.abort(&run.decode, &run.leg_id, reason);
        }
        if let Some(a) = run.attempt.take() {
            self.abort(&a.instance, &run.leg_id, reason);
        }
        result?;
        Ok(self.outcome(&run))
    }

    /// After decode reported a KV failure before commit: aborts both legs of the failed pair, then,
    /// within the prefill budget, opens a fresh decode leg (under the next pair's id) and chooses
    /// another prefill instance for it. Otherwise the decode's error is final.
    async fn retry_pair(
        &self,
        run: &mut Run<'_>,
        features: &RequestFeatures<'_>,
        tx: &mpsc::Sender<GenEvent>,
        error: ApiError,
        reason: &'static str,
    ) -> Result<(Arc<Instance>, DecodeLeg), Interrupt> {
        let failed_prefill = match run.attempt.take() {
            Some(a) => {
                self.abort(&a.instance, &run.leg_id, "retry");
                Some(a.instance.id.clone())
            }
            None => run.prefill_done.take().map(|(id, _)| id),
        };
        // `decode_finished` is set (the error ended D's stream); the abort frees whatever D may
        // still hold.
        self.abort(&run.decode, &run.leg_id, "retry");
        let final_error = || Interrupt::Failed(error.clone(), reason);
        if run.attempts >= self.retries.prefill_attempts {
            return Err(final_error());
        }
        let leg_id = format!("{}.{}", run.spec.request_id, run.pairs + 1);
        let Some((decode, leg)) = self
            .open_decode(run.spec, &leg_id, tx, features, &mut run.rng)
            .await?
        else {
            return Err(Interrupt::Gone);
        };
        let tried = run.tried.clone();
        let prefill = match self.select_prefill(features, &decode, &tried, &mut run.rng) {
            Ok(p) => p,
            Err(_) => {
                self.abort(&decode, &leg_id, "retry");
                return Err(final_error());
            }
        };
        self.metrics
            .counter(
                &catalog::ROUTER_RETRIES_TOTAL,
                &[("role", "prefill"), ("reason", reason)],
            )
            .increment(1);
        tracing::info!(
            request_id = %leg_id,
            from = failed_prefill.as_deref().unwrap_or("-"),
            to = %prefill.id,
            decode = %decode.id,
            reason,
            "decode reported a KV failure before its first token; retrying the prefill/decode pair"
        );
        run.decode = decode;
        run.decode_finished = false;
        run.prefill_done = None;
        run.leg_id = leg_id;
        run.pairs += 1;
        Ok((prefill, leg))
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
                            .with_diagnostic(format!("request {} stage {stage}", run.leg_id)),
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
                let error = ApiError::new(error_kind, client_message)
                    .with_code(reason)
                    .with_diagnostic(format!("decode {}: {kind:?}: {message}", run.decode.id));
                let kv_failure = matches!(
                    kind,
                    DecodeErrorKind::KvInvalid | DecodeErrorKind::KvTimeout
                );
                if kv_failure && run.committed_at.is_none() {
                    // Nothing reached the client: the prefill leg failed, the pair may be retried.
                    return Err(Interrupt::PairFailed(error, reason));
                }
                Err(Interrupt::Failed(error, reason))
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
                    tracing::debug!(request_id = %run.leg_id, error = %e, "prefill answer lost after commit");
                    return Ok(());
                }
                // The failed instance may still hold the request (e.g. after a timeout).
                self.abort(&attempt.instance, &run.leg_id, "retry");
                if !e.retryable() || run.attempts >= self.retries.prefill_attempts {
                    return Err(Interrupt::Failed(e.to_api_error("prefill"), e.reason()));
                }
                let features = RequestFeatures {
                    seq: run.spec.seq,
                    prompt_token_ids: &run.spec.prompt,
                };
                let tried = run.tried.clone();
                let Ok(next) = self.select_prefill(&features, &run.decode, &tried, &mut run.rng)
                else {
                    return Err(Interrupt::Failed(e.to_api_error("prefill"), e.reason()));
                };
                self.metrics
                    .counter(
                        &catalog::ROUTER_RETRIES_TOTAL,
                        &[("role", "prefill"), ("reason", e.reason())],
                    )
                    .increment(1);
                tracing::info!(request_id = %run.leg_id, from = %attempt.instance.id, to = %next.id, error = %e, "retrying prefill");
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
