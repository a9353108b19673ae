//! What both services share: errors of starting and serving, the engine failure → client error
//! mapping, the endpoints every instance serves besides its own (`POST /internal/abort`,
//! `GET /internal/stats`, `GET /health`, `GET /metrics`) and serving them, and request
//! validation common to prefill and decode.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pdserve_engine::{Executor, StepClock};
use pdserve_protocol::http::{ApiJson, method_not_allowed, not_found};
use pdserve_protocol::internal::{
    ABORT_PATH, AbortRequest, AbortResponse, HEALTH_PATH, HealthResponse, InstanceStats, Role,
    STATS_PATH, SimInfo,
};
use pdserve_protocol::params::StopParams;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::net::TcpListener;

use crate::backend::{EngineParts, KvAccess, KvTransferClock, SeqParams};
use crate::config::{ConfigError, EngineConfig};
use crate::engine::{EngineHandle, EngineSnapshot, FailureKind, SpawnError, spawn_engine};
use crate::metrics::ServiceMetrics;

/// Why a service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] SpawnError),
    /// The metrics registry could not be built.
    #[error("building the metrics registry: {0}")]
    Metrics(String),
    /// A listener or the HTTP server failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// The client error for an engine failure event.
pub(crate) fn failure_to_api(kind: FailureKind, message: &str) -> ApiError {
    let (kind, client, code) = match kind {
        FailureKind::Aborted => (ErrorKind::Unavailable, "the request was aborted", "aborted"),
        FailureKind::Internal => (
            ErrorKind::Internal,
            "the instance's engine failed the request",
            "engine_failure",
        ),
        FailureKind::ShutDown => (
            ErrorKind::Unavailable,
            "the instance is shutting down",
            "shutting_down",
        ),
    };
    ApiError::new(kind, client)
        .with_code(code)
        .with_diagnostic(message.to_string())
}

/// Checks what prefill and decode requests share: an id, a prompt that fits the context, and
/// consistent stop parameters.
pub(crate) fn validate_common(
    request_id: &str,
    prompt: &[u32],
    stop: &StopParams,
    max_context_tokens: usize,
) -> Result<(), ApiError> {
    if request_id.is_empty() {
        return Err(ApiError::invalid_param(
            "request_id",
            "request_id must not be empty",
        ));
    }
    if request_id.len() > usize::from(u16::MAX) {
        return Err(ApiError::invalid_param(
            "request_id",
            "request_id must be at most 65535 bytes",
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt_token_ids",
            "prompt_token_ids must not be empty",
        ));
    }
    if prompt.len() >= max_context_tokens {
        return Err(ApiError::invalid_param(
            "prompt_token_ids",
            format!(
                "the prompt has {} tokens; this instance's context is {max_context_tokens} tokens",
                prompt.len()
            ),
        ));
    }
    if stop.max_tokens == 0 {
        return Err(ApiError::invalid_param(
            "stop.max_tokens",
            "must be at least 1",
        ));
    }
    if stop.min_tokens > stop.max_tokens {
        return Err(ApiError::invalid_param(
            "stop.min_tokens",
            format!(
                "min_tokens ({}) exceeds max_tokens ({})",
                stop.min_tokens, stop.max_tokens
            ),
        ));
    }
    Ok(())
}

/// A service's metrics registry and its engine on `parts`, recording into it.
pub(crate) fn start_engine<E, C>(
    role: Role,
    instance_id: &str,
    config: &EngineConfig,
    parts: EngineParts<E, C>,
) -> Result<(ServiceMetrics, EngineHandle), ServeError>
where
    E: Executor<SeqParams> + KvAccess + Send + 'static,
    C: StepClock<SeqParams, E::Routing> + KvTransferClock + Send + 'static,
{
    let metrics =
        ServiceMetrics::new(role, instance_id).map_err(|e| ServeError::Metrics(e.to_string()))?;
    let engine = spawn_engine(config, parts, metrics.engine(config.scheduler.spec_tokens))?;
    Ok((metrics, engine))
}

/// A role's shared handler state, as the endpoints every instance serves see it.
pub(crate) trait InstanceState: Send + Sync + 'static {
    /// The engine, the instance's metrics registry and the largest request body accepted.
    fn parts(&self) -> (&EngineHandle, &ServiceMetrics, usize);
    /// Cancels `request_id` wherever the instance holds it; true when it was found.
    fn abort(&self, request_id: &str) -> impl Future<Output = bool> + Send;
    /// `GET /internal/stats`.
    fn stats(&self) -> impl Future<Output = Result<InstanceStats, ApiError>> + Send;
}

/// An instance's HTTP API: `own` (the role's endpoints) plus abort, stats, health and metrics,
/// under the body limit, with the JSON 404 and 405 answers.
pub(crate) fn instance_app<S: InstanceState>(state: Arc<S>, own: Router<Arc<S>>) -> Router {
    let (_, _, limit) = state.parts();
    own.route(ABORT_PATH, post(abort::<S>))
        .route(STATS_PATH, get(stats::<S>))
        .route(HEALTH_PATH, get(health_check::<S>))
        .route("/metrics", get(render_metrics::<S>))
        .layer(DefaultBodyLimit::max(limit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves; `context` names it in an error.
pub(crate) async fn serve_app(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    context: &'static str,
) -> Result<(), ServeError> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Io { context, source })
}

async fn abort<S: InstanceState>(
    State(s): State<Arc<S>>,
    ApiJson(request): ApiJson<AbortRequest>,
) -> axum::Json<AbortResponse> {
    let found = s.abort(&request.request_id).await;
    axum::Json(AbortResponse {
        request_id: request.request_id,
        found,
    })
}

async fn stats<S: InstanceState>(
    State(s): State<Arc<S>>,
) -> Result<axum::Json<InstanceStats>, ApiError> {
    s.stats().await.map(axum::Json)
}

async fn health_check<S: InstanceState>(
    State(s): State<Arc<S>>,
) -> Result<axum::Json<HealthResponse>, ApiError> {
    health(s.parts().0).await
}

async fn render_metrics<S: InstanceState>(State(s): State<Arc<S>>) -> Response {
    metrics_response(s.parts().1.render())
}

/// `GET /health`: 200 while the engine runs, 503 once it broke or stopped.
async fn health(engine: &EngineHandle) -> Result<axum::Json<HealthResponse>, ApiError> {
    match engine.snapshot().await {
        Some(EngineSnapshot { broken: None, .. }) => Ok(axum::Json(HealthResponse::ok())),
        Some(EngineSnapshot {
            broken: Some(reason),
            ..
        }) => Err(
            ApiError::new(ErrorKind::Unavailable, "the instance's engine failed")
                .with_code("engine_unavailable")
                .with_diagnostic(reason),
        ),
        None => Err(
            ApiError::new(ErrorKind::Unavailable, "the instance's engine stopped")
                .with_code("engine_unavailable"),
        ),
    }
}

/// Load that the engine does not see, added to its stats (decode: requests waiting for KV).
#[derive(Clone, Debug, Default)]
pub(crate) struct ExtraLoad {
    pub(crate) waiting: u32,
    pub(crate) queued_prompt_tokens: u64,
}

/// `GET /internal/stats` from an engine snapshot.
pub(crate) async fn instance_stats(
    engine: &EngineHandle,
    role: Role,
    instance_id: &str,
    kv_addr: Option<String>,
    extra: ExtraLoad,
) -> Result<InstanceStats, ApiError> {
    let snap = engine.snapshot().await.ok_or_else(|| {
        ApiError::new(ErrorKind::Unavailable, "the instance's engine stopped")
            .with_code("engine_unavailable")
    })?;
    let info = engine.info();
    let s = &snap.stats;
    let as_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(InstanceStats {
        instance_id: instance_id.to_string(),
        role,
        running: as_u32(s.num_running),
        waiting: as_u32(s.num_waiting).saturating_add(extra.waiting),
        kv_usage: s.kv_usage_fraction(),
        kv_blocks_free: s.kv_blocks_total.saturating_sub(s.kv_blocks_used) as u64,
        kv_blocks_total: s.kv_blocks_total as u64,
        queued_prompt_tokens: snap
            .queued_prompt_tokens
            .saturating_add(extra.queued_prompt_tokens),
        kv_addr,
        max_model_len: Some(as_u32(info.scheduler.max_context_tokens)),
        kv_layers: Some(as_u32(info.shape.num_layers)),
        sim: info.sim.as_ref().map(|l| SimInfo {
            hardware: l.hardware.clone(),
            time_scale: info.time_scale,
            modeled_model: l.modeled_model.clone(),
            mode: l.mode,
        }),
    })
}

/// `GET /metrics`: Prometheus text exposition.
fn metrics_response(text: String) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// Simulated ns × `time_scale` as a wall duration (saturating).
pub(crate) fn scaled(simulated_ns: u64, time_scale: f64) -> std::time::Duration {
    let ns = (simulated_ns as f64 * time_scale).round();
    if ns >= u64::MAX as f64 {
        std::time::Duration::from_nanos(u64::MAX)
    } else {
        std::time::Duration::from_nanos(ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(max: u32, min: u32) -> StopParams {
        StopParams {
            max_tokens: max,
            stop_token_ids: vec![],
            ignore_eos: false,
            min_tokens: min,
        }
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let cases = [
            (validate_common("", &[1], &stop(1, 0), 8), "request_id"),
            (
                validate_common("r", &[], &stop(1, 0), 8),
                "prompt_token_ids",
            ),
            (
                validate_common("r", &[1; 8], &stop(1, 0), 8),
                "prompt_token_ids",
            ),
            (
                validate_common("r", &[1], &stop(0, 0), 8),
                "stop.max_tokens",
            ),
            (
                validate_common("r", &[1], &stop(2, 3), 8),
                "stop.min_tokens",
            ),
        ];
        for (result, param) in cases {
            let e = result.unwrap_err();
            assert_eq!((e.status(), e.param.as_deref()), (400, Some(param)));
        }
        validate_common("r", &[1; 7], &stop(2, 2), 8).unwrap();
    }

    #[test]
    fn scaling_rounds_and_zero_scale_is_zero() {
        assert_eq!(scaled(1_000, 2.5).as_nanos(), 2_500);
        assert_eq!(scaled(1_000, 0.0).as_nanos(), 0);
        assert_eq!(scaled(u64::MAX, 4.0).as_nanos(), u128::from(u64::MAX));
    }

    #[test]
    fn aborts_and_shutdowns_are_503_and_engine_failures_500() {
        assert_eq!(failure_to_api(FailureKind::Aborted, "x").status(), 503);
        assert_eq!(failure_to_api(FailureKind::ShutDown, "x").status(), 503);
        let e = failure_to_api(FailureKind::Internal, "executor exploded");
        assert_eq!(e.status(), 500);
        assert!(
            !serde_json::to_string(&e.envelope())
                .unwrap()
                .contains("exploded")
        );
    }
}
