//! The prefill service: `POST /internal/prefill` (plus `POST /internal/abort`,
//! `GET /internal/stats`, `GET /health`, `GET /metrics`) around one engine.
//!
//! One prefill, in order: the prompt is queued in the engine (chunked, batched with other
//! prompts) with its KV retained; the engine samples the first token; the request's latent KV
//! (every cached layer) is read out; a KV frame is pushed to the decode target's `kv_addr` over
//! TCP, its checksum held back until the simulated transfer time (`kv_transfer_ns(tokens)` ×
//! `time_scale`) has passed; the receiver acknowledges; the blocks are released; the answer
//! reports queue, prefill and transfer times.
//!
//! Invariant: whatever fails, and whenever the caller goes away (the handler future is dropped),
//! the request's blocks are freed: the engine stream is dropped before its terminal event,
//! which cancels the request. `POST /internal/abort` cancels it too, which also interrupts a
//! transfer in progress.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use metrics::{Counter, Histogram};
use pdserve_engine::{Executor, StepClock};
use pdserve_protocol::http::ApiJson;
use pdserve_protocol::internal::{
    InstanceStats, PREFILL_PATH, PrefillRequest, PrefillResponse, PrefillTimings, Role,
    SampledToken,
};
use pdserve_protocol::params::SamplingParams;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::backend::{EngineParts, KvAccess, KvTransferClock, SeqParams};
use crate::config::PrefillConfig;
use crate::engine::{
    EngineEvent, EngineHandle, ExportError, KvInput, RequestReport, RequestStream, Submission,
};
use crate::kv::{KvAck, OutgoingKv, encode_kv_frame};
use crate::metrics::{ServiceMetrics, catalog};
use crate::service::{
    ExtraLoad, InstanceState, ServeError, failure_to_api, instance_app, instance_stats, scaled,
    serve_app, start_engine, validate_common,
};
use crate::transfer::{PushError, PushTimeouts, push_frame};

/// Transfer metric handles.
#[derive(Clone, Debug)]
struct TransferMetrics {
    seconds: Histogram,
    simulated_seconds: Histogram,
    lag_seconds: Histogram,
    bytes: Counter,
    failures: [(&'static str, Counter); 6],
    /// Per request, first scheduled step to its prompt computed (not a transfer metric, kept
    /// with them as the other per-request prefill timing).
    request_prefill_seconds: Histogram,
}

impl TransferMetrics {
    fn new(m: &ServiceMetrics) -> Self {
        let failure = |reason| {
            (
                reason,
                m.counter(
                    &catalog::PREFILL_KV_TRANSFER_FAILURES_TOTAL,
                    &[("reason", reason)],
                ),
            )
        };
        Self {
            seconds: m.histogram(&catalog::PREFILL_KV_TRANSFER_SECONDS),
            simulated_seconds: m.histogram(&catalog::PREFILL_KV_TRANSFER_SIMULATED_SECONDS),
            lag_seconds: m.histogram(&catalog::PREFILL_KV_TRANSFER_LAG_SECONDS),
            bytes: m.counter(&catalog::PREFILL_KV_TRANSFER_BYTES_TOTAL, &[]),
            failures: ["connect", "timeout", "io", "rejected", "aborted", "export"].map(failure),
            request_prefill_seconds: m.histogram(&catalog::PREFILL_REQUEST_PREFILL_TIME_SECONDS),
        }
    }

    fn failed(&self, reason: &str) {
        if let Some((_, c)) = self.failures.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }
}

/// Shared state of the prefill handlers.
#[derive(Debug)]
pub struct PrefillState {
    config: PrefillConfig,
    engine: EngineHandle,
    metrics: ServiceMetrics,
    transfer: TransferMetrics,
}

/// A running prefill service; serve [`PrefillService::router`] over HTTP.
#[derive(Debug)]
pub struct PrefillService {
    state: Arc<PrefillState>,
}

impl PrefillService {
    /// Validates `config` and starts the engine on `parts`. Must be called inside a tokio
    /// runtime.
    pub fn start<E, C>(config: PrefillConfig, parts: EngineParts<E, C>) -> Result<Self, ServeError>
    where
        E: Executor<SeqParams> + KvAccess + Send + 'static,
        C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
    {
        config.validate()?;
        let (metrics, engine) =
            start_engine(Role::Prefill, &config.instance_id, &config.engine, parts)?;
        let transfer = TransferMetrics::new(&metrics);
        Ok(Self {
            state: Arc::new(PrefillState {
                config,
                engine,
                metrics,
                transfer,
            }),
        })
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        prefill_app(Arc::clone(&self.state))
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.state.engine
    }

    /// Serves the HTTP API on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        tracing::info!(instance = %self.state.config.instance_id, "prefill instance serving");
        serve_app(
            self.router(),
            listener,
            shutdown,
            "serving the prefill HTTP API",
        )
        .await
    }

    /// Renders this instance's `/metrics` text; cheap to call from another service (`pdserve up`
    /// serves every in-process instance's metrics on the router's endpoint).
    pub fn metrics_renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        self.state.metrics.renderer()
    }
}

/// The prefill HTTP API over `state`.
pub fn prefill_app(state: Arc<PrefillState>) -> Router {
    instance_app(state, Router::new().route(PREFILL_PATH, post(prefill)))
}

impl InstanceState for PrefillState {
    fn parts(&self) -> (&EngineHandle, &ServiceMetrics, usize) {
        (&self.engine, &self.metrics, self.config.max_body_bytes)
    }

    async fn abort(&self, request_id: &str) -> bool {
        self.engine.cancel(request_id).await
    }

    async fn stats(&self) -> Result<InstanceStats, ApiError> {
        let id = &self.config.instance_id;
        instance_stats(&self.engine, Role::Prefill, id, None, ExtraLoad::default()).await
    }
}

/// Runs a prefill instance until `shutdown` resolves, then drains in-flight prefills.
pub async fn serve_prefill<E, C>(
    config: PrefillConfig,
    parts: EngineParts<E, C>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Executor<SeqParams> + KvAccess + Send + 'static,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
{
    PrefillService::start(config, parts)?
        .serve(listener, shutdown)
        .await
}

async fn prefill(
    State(s): State<Arc<PrefillState>>,
    ApiJson(request): ApiJson<PrefillRequest>,
) -> Result<axum::Json<PrefillResponse>, ApiError> {
    s.run(request).await.map(axum::Json)
}

impl PrefillState {
    async fn run(&self, request: PrefillRequest) -> Result<PrefillResponse, ApiError> {
        validate_common(
            &request.request_id,
            &request.prompt_token_ids,
            &request.stop,
            self.engine.info().scheduler.max_context_tokens,
        )?;
        if request.decode.kv_addr.is_empty() {
            return Err(ApiError::invalid_param(
                "decode.kv_addr",
                "decode.kv_addr must be host:port",
            ));
        }
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let want_logprobs = request.sampling.logprobs.is_some();
        let prompt_tokens = request.prompt_token_ids.len();
        let submission = Submission {
            request_id: request.request_id.clone(),
            prompt: request.prompt_token_ids,
            params: SeqParams {
                sampling: SamplingParams {
                    seed: Some(seed),
                    ..request.sampling
                },
                stop: request.stop,
            },
            max_output_tokens: 1,
            kv: KvInput::Compute { retain: true },
        };
        let mut stream = self
            .engine
            .submit(submission)
            .await
            .map_err(|e| e.to_api_error())?;
        let (first_token, report) = first_token(&mut stream, want_logprobs).await?;
        self.transfer
            .request_prefill_seconds
            .record(report.compute_s);
        let id = request.request_id;
        let exported = self.engine.export_kv(&id).await.map_err(|e| {
            self.transfer.failed("export");
            export_error(&e)
        })?;
        let frame = encode_kv_frame(&OutgoingKv {
            request_id: &id,
            first_token: first_token.clone(),
            seed,
            draft_token: exported.draft_token,
            rows: &exported.rows,
        })
        .map_err(|e| ApiError::internal(format!("encoding the kv frame of `{id}`: {e}")))?;

        let simulated = Duration::from_nanos(exported.transfer_simulated_ns);
        let time_scale = self.engine.info().time_scale;
        let start = Instant::now();
        let due = start + scaled(exported.transfer_simulated_ns, time_scale);
        let limits = PushTimeouts {
            connect: Duration::from_millis(self.config.kv_connect_timeout_ms),
            write: Duration::from_millis(self.config.kv_write_timeout_ms),
            ack: Duration::from_millis(self.config.kv_ack_timeout_ms),
        };
        let push = push_frame(
            &request.decode.kv_addr,
            &frame,
            (time_scale > 0.0).then_some(due),
            limits,
        );
        let written_at = tokio::select! {
            pushed = push => pushed.map_err(|e| {
                self.transfer.failed(e.reason());
                push_error(&e)
            })?,
            event = stream.next() => {
                // Only a cancel can end a retained request now.
                self.transfer.failed("aborted");
                return Err(match event {
                    Some(EngineEvent::Failed { kind, message }) => failure_to_api(kind, &message),
                    other => ApiError::internal(format!(
                        "request `{id}`: unexpected engine event during the kv transfer: {other:?}"
                    )),
                });
            }
        };
        let transfer_s = written_at.duration_since(start).as_secs_f64();
        self.transfer.seconds.record(transfer_s);
        self.transfer
            .simulated_seconds
            .record(simulated.as_secs_f64());
        self.transfer
            .lag_seconds
            .record(written_at.saturating_duration_since(due).as_secs_f64());
        self.transfer.bytes.increment(frame.len() as u64);

        if !self.engine.release_kv(&id).await {
            return Err(
                ApiError::new(ErrorKind::Unavailable, "the request was aborted")
                    .with_code("aborted")
                    .with_diagnostic(format!("request `{id}` was cancelled before its release")),
            );
        }
        // Consume the terminal `Done` so that dropping the stream does not cancel.
        while let Some(event) = stream.next().await {
            if event.is_terminal() {
                break;
            }
        }
        Ok(PrefillResponse {
            request_id: id,
            first_token,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            cached_tokens: 0,
            timings: PrefillTimings {
                queue_s: report.queue_s,
                prefill_s: report.compute_s,
                transfer_s,
                simulated_prefill_s: report.simulated_s,
            },
        })
    }
}

/// Waits for the first token and the retained KV.
async fn first_token(
    stream: &mut RequestStream,
    want_logprobs: bool,
) -> Result<(SampledToken, RequestReport), ApiError> {
    let mut first: Option<SampledToken> = None;
    while let Some(event) = stream.next().await {
        match event {
            EngineEvent::Tokens { ids, logprobs, .. } => {
                let Some(&id) = ids.first() else { continue };
                let logprob = logprobs.as_ref().and_then(|l| l.first());
                if want_logprobs && logprob.is_none() {
                    return Err(ApiError::internal(
                        "the executor reported no logprob for the first token",
                    ));
                }
                first = Some(SampledToken {
                    id,
                    // Unobservable when logprobs were not requested (checked above).
                    logprob: logprob.map_or(0.0, |l| l.logprob),
                    top_logprobs: logprob.map(|l| l.top_logprobs.clone()).unwrap_or_default(),
                });
            }
            EngineEvent::KvRetained(report) => {
                return first.map(|t| (t, report)).ok_or_else(|| {
                    ApiError::internal("the prefill ended without sampling a token")
                });
            }
            EngineEvent::Failed { kind, message } => return Err(failure_to_api(kind, &message)),
            EngineEvent::Done(_) => break,
        }
    }
    Err(ApiError::internal(
        "the prefill ended without retaining its KV",
    ))
}

fn export_error(e: &ExportError) -> ApiError {
    match e {
        ExportError::Unknown(_) => ApiError::new(ErrorKind::Unavailable, "the request was aborted")
            .with_code("aborted")
            .with_diagnostic(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// The client error of a failed push (the peer address stays in the diagnostic).
fn push_error(e: &PushError) -> ApiError {
    let (kind, message, code) = match e {
        PushError::Connect { .. } => (
            ErrorKind::Unavailable,
            "could not connect to the decode instance's KV receiver",
            "kv_transfer_connect_failed",
        ),
        PushError::Timeout { .. } => (
            ErrorKind::Timeout,
            "the KV transfer to the decode instance timed out",
            "kv_transfer_timeout",
        ),
        PushError::Io { .. } | PushError::Protocol { .. } => (
            ErrorKind::Unavailable,
            "the KV transfer to the decode instance failed",
            "kv_transfer_failed",
        ),
        PushError::Rejected {
            ack: KvAck::Overloaded,
            ..
        } => (
            ErrorKind::Unavailable,
            "the decode instance is overloaded",
            "decode_overloaded",
        ),
        PushError::Rejected {
            ack: KvAck::Invalid,
            ..
        } => (
            ErrorKind::Internal,
            "the decode instance rejected the KV frame as invalid",
            "kv_transfer_rejected",
        ),
        PushError::Rejected { .. } => (
            ErrorKind::Unavailable,
            "the decode instance no longer wants this request's KV",
            "kv_transfer_unwanted",
        ),
    };
    ApiError::new(kind, message)
        .with_code(code)
        .with_diagnostic(e.to_string())
}
