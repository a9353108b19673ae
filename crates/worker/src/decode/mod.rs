//! The decode service: the internal HTTP API for decode (`POST /internal/decode`,
//! `POST /internal/abort`, `GET /internal/stats`, `GET /health`, `GET /metrics`) and the TCP KV
//! receiver, around one engine.
//!
//! `POST /internal/decode` registers the request with the rendezvous *before* answering the
//! response head (200, `application/x-ndjson`), then streams [`DecodeEvent`]s: the first token
//! from the KV frame, later tokens as the engine releases them, then `done`, or one `error`
//! (`kv_timeout`, `kv_invalid`, `overloaded`, `aborted`, `internal`). Every stream ends with
//! exactly one `done` or `error`. A client that disconnects drops the stream, which cancels the
//! request and frees its blocks.

mod receiver;
mod rendezvous;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use pdserve_engine::{Executor, StepClock};
use pdserve_protocol::ApiError;
use pdserve_protocol::http::ApiJson;
use pdserve_protocol::internal::{
    DECODE_PATH, DecodeErrorKind, DecodeEvent, DecodeRequest, DecodeTimings, DecodeUsage,
    InstanceStats, NDJSON_CONTENT_TYPE, Role,
};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use self::receiver::{ReceiverContext, ReceiverMetrics};
use self::rendezvous::{
    Admission, Admitted, RendezvousHandle, RendezvousLimits, RendezvousMetrics,
};
use crate::backend::{EngineParts, KvAccess, KvTransferClock, SeqParams};
use crate::config::DecodeConfig;
use crate::engine::{EngineEvent, EngineHandle, FailureKind};
use crate::metrics::{ServiceMetrics, catalog};
use crate::service::{
    ExtraLoad, InstanceState, ServeError, instance_app, instance_stats, serve_app, start_engine,
};

/// The decode service's pre-bound listeners.
#[derive(Debug)]
pub struct DecodeListeners {
    /// Internal HTTP API.
    pub http: TcpListener,
    /// KV receiver.
    pub kv: TcpListener,
}

/// Shared state of the decode handlers.
#[derive(Debug)]
pub struct DecodeState {
    config: DecodeConfig,
    engine: EngineHandle,
    rendezvous: RendezvousHandle,
    metrics: ServiceMetrics,
    kv_addr: String,
}

/// A running decode service (engine, rendezvous, KV receiver); serve [`DecodeService::router`]
/// over HTTP. Dropping it stops the KV receiver.
#[derive(Debug)]
pub struct DecodeService {
    state: Arc<DecodeState>,
    stop: watch::Sender<bool>,
}

impl DecodeService {
    /// Validates `config`, starts the engine on `parts`, and the KV receiver on `kv_listener`.
    /// Must be called inside a tokio runtime.
    pub fn start<E, C>(
        config: DecodeConfig,
        parts: EngineParts<E, C>,
        kv_listener: TcpListener,
    ) -> Result<Self, ServeError>
    where
        E: Executor<SeqParams> + KvAccess + Send + 'static,
        C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
    {
        config.validate()?;
        let (metrics, engine) =
            start_engine(Role::Decode, &config.instance_id, &config.engine, parts)?;
        let rendezvous = RendezvousHandle::spawn(
            engine.clone(),
            RendezvousLimits {
                max_pending: config.max_pending_requests,
                max_staged_bytes: config.max_staged_kv_bytes,
                orphan_timeout: Duration::from_millis(config.kv_orphan_timeout_ms),
            },
            RendezvousMetrics {
                kv_wait: metrics.histogram(&catalog::DECODE_KV_WAIT_SECONDS),
                timeouts: metrics.counter(&catalog::DECODE_KV_TIMEOUTS_TOTAL, &[]),
                orphans_expired: metrics.counter(&catalog::DECODE_KV_ORPHANS_EXPIRED_TOTAL, &[]),
                waiting: metrics.gauge(&catalog::DECODE_KV_WAITING_REQUESTS),
                staged: metrics.gauge(&catalog::DECODE_KV_STAGED_FRAMES),
            },
        );
        let bound = kv_listener.local_addr().map_err(|source| ServeError::Io {
            context: "reading the kv listener's address",
            source,
        })?;
        let kv_addr = config
            .kv_advertise
            .clone()
            .unwrap_or_else(|| bound.to_string());
        let frames =
            |outcome| metrics.counter(&catalog::DECODE_KV_FRAMES_TOTAL, &[("outcome", outcome)]);
        let ctx = Arc::new(ReceiverContext {
            rendezvous: rendezvous.clone(),
            shape: engine.info().shape,
            max_payload_bytes: config.max_kv_payload_bytes,
            idle: Duration::from_millis(config.kv_idle_timeout_ms),
            metrics: ReceiverMetrics {
                accepted: frames("accepted"),
                invalid: frames("invalid"),
                unwanted: frames("unwanted"),
                overloaded: frames("overloaded"),
                failed: frames("failed"),
                bytes: metrics.counter(&catalog::DECODE_KV_RECEIVED_BYTES_TOTAL, &[]),
            },
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(receiver::run(kv_listener, ctx, stop_rx));
        let state = Arc::new(DecodeState {
            config,
            engine,
            rendezvous,
            metrics,
            kv_addr,
        });
        Ok(Self { state, stop })
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        decode_app(Arc::clone(&self.state))
    }

    /// `host:port` prefill instances push KV to (as reported in stats).
    pub fn kv_addr(&self) -> &str {
        &self.state.kv_addr
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.state.engine
    }

    /// Serves the HTTP API on `listener` until `shutdown` resolves, then stops the KV receiver.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        tracing::info!(
            instance = %self.state.config.instance_id,
            kv_addr = %self.kv_addr(),
            "decode instance serving"
        );
        let app = self.router();
        serve_app(app, listener, shutdown, "serving the decode HTTP API").await?;
        drop(self);
        Ok(())
    }

    /// Renders this instance's `/metrics` text; cheap to call from another service (`pdserve up`
    /// serves every in-process instance's metrics on the router's endpoint).
    pub fn metrics_renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        self.state.metrics.renderer()
    }
}

impl Drop for DecodeService {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The decode HTTP API over `state`.
pub fn decode_app(state: Arc<DecodeState>) -> Router {
    instance_app(state, Router::new().route(DECODE_PATH, post(decode)))
}

impl InstanceState for DecodeState {
    fn parts(&self) -> (&EngineHandle, &ServiceMetrics, usize) {
        (&self.engine, &self.metrics, self.config.max_body_bytes)
    }

    /// A request still waiting for its KV is dropped from the rendezvous; a running one is
    /// cancelled in the engine.
    async fn abort(&self, request_id: &str) -> bool {
        let pending = self.rendezvous.abort(request_id).await;
        let running = self.engine.cancel(request_id).await;
        pending || running
    }

    /// Requests waiting for their KV count as waiting, their prompts as queued tokens.
    async fn stats(&self) -> Result<InstanceStats, ApiError> {
        let pending = self.rendezvous.counts().await;
        let extra = ExtraLoad {
            waiting: u32::try_from(pending.waiting).unwrap_or(u32::MAX),
            queued_prompt_tokens: pending.waiting_prompt_tokens,
        };
        let (id, kv_addr) = (&self.config.instance_id, Some(self.kv_addr.clone()));
        instance_stats(&self.engine, Role::Decode, id, kv_addr, extra).await
    }
}

/// Runs a decode instance until `shutdown` resolves, then drains: in-flight streams finish
/// (still receiving KV), then the KV receiver and the engine stop.
pub async fn serve_decode<E, C>(
    config: DecodeConfig,
    parts: EngineParts<E, C>,
    listeners: DecodeListeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Executor<SeqParams> + KvAccess + Send + 'static,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
{
    DecodeService::start(config, parts, listeners.kv)?
        .serve(listeners.http, shutdown)
        .await
}

async fn decode(
    State(s): State<Arc<DecodeState>>,
    ApiJson(request): ApiJson<DecodeRequest>,
) -> Result<Response, ApiError> {
    crate::service::validate_common(
        &request.request_id,
        &request.prompt_token_ids,
        &request.stop,
        s.engine.info().scheduler.max_context_tokens,
    )?;
    if request.kv_timeout_ms == 0 {
        return Err(ApiError::invalid_param(
            "kv_timeout_ms",
            "kv_timeout_ms must be at least 1",
        ));
    }
    let show_logprobs = request.sampling.logprobs.is_some();
    let admission = s.rendezvous.register(request).await?;
    let body = Body::from_stream(event_lines(admission, show_logprobs));
    Ok(([(CONTENT_TYPE, NDJSON_CONTENT_TYPE)], body).into_response())
}

enum BodyState {
    Awaiting(oneshot::Receiver<Admission>),
    Streaming(Admitted),
    Ended,
}

/// The decode stream: waits for admission, then maps engine events to protocol events.
fn event_lines(
    admission: oneshot::Receiver<Admission>,
    show_logprobs: bool,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    futures::stream::unfold(BodyState::Awaiting(admission), move |state| async move {
        let admitted = match state {
            BodyState::Ended => return None,
            BodyState::Streaming(admitted) => admitted,
            BodyState::Awaiting(rx) => match rx.await {
                Ok(Ok(admitted)) => admitted,
                Ok(Err(event)) => return Some((line(&event), BodyState::Ended)),
                Err(_) => {
                    let event = DecodeEvent::Error {
                        kind: DecodeErrorKind::Internal,
                        message: "the decode instance dropped the request".into(),
                    };
                    return Some((line(&event), BodyState::Ended));
                }
            },
        };
        next_event(admitted, show_logprobs).await
    })
}

async fn next_event(
    mut admitted: Admitted,
    show_logprobs: bool,
) -> Option<(Result<Bytes, Infallible>, BodyState)> {
    let event = admitted.stream.next().await?;
    let (event, next) = match event {
        EngineEvent::Tokens {
            ids,
            logprobs,
            finish,
        } => (
            DecodeEvent::Tokens {
                ids,
                logprobs: logprobs.filter(|_| show_logprobs),
                finish_reason: finish,
            },
            BodyState::Streaming(admitted),
        ),
        EngineEvent::Done(report) => (
            DecodeEvent::Done {
                usage: DecodeUsage {
                    prompt_tokens: report.prompt_tokens,
                    completion_tokens: report.output_tokens,
                },
                timings: DecodeTimings {
                    kv_wait_s: admitted.kv_wait_s,
                    queue_s: report.queue_s,
                    decode_s: report.compute_s,
                    simulated_decode_s: report.simulated_s,
                },
            },
            BodyState::Ended,
        ),
        EngineEvent::Failed { kind, message } => (
            DecodeEvent::Error {
                kind: match kind {
                    FailureKind::Aborted => DecodeErrorKind::Aborted,
                    FailureKind::Internal | FailureKind::ShutDown => DecodeErrorKind::Internal,
                },
                message,
            },
            BodyState::Ended,
        ),
        EngineEvent::KvRetained(_) => (
            DecodeEvent::Error {
                kind: DecodeErrorKind::Internal,
                message: "a decode request retained its KV (engine misuse)".into(),
            },
            BodyState::Ended,
        ),
    };
    Some((line(&event), next))
}

fn line(event: &DecodeEvent) -> Result<Bytes, Infallible> {
    let mut bytes = serde_json::to_vec(event).unwrap_or_else(|e| {
        // Serializing these plain structs cannot fail; keep the stream well-formed regardless.
        format!(r#"{{"event":"error","kind":"internal","message":"serializing an event: {e}"}}"#)
            .into_bytes()
    });
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}
