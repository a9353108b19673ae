//! HTTP surface: routes, thin handlers (extract, one domain call, map), API-key and request
//! accounting middleware, and [`serve`] with graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Extension, Json};
use futures::StreamExt;
use pdserve_protocol::http::{ApiJson, method_not_allowed, not_found};
use pdserve_protocol::internal::HealthResponse;
use pdserve_protocol::openai::ModelList;
use pdserve_protocol::openai::chat::ChatCompletionRequest;
use pdserve_protocol::openai::completions::CompletionRequest;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::net::TcpListener;

use crate::config::RouterConfig;
use crate::generate::{self, Reply};
use crate::health;
use crate::state::{AppState, RouterError};

/// When the request reached the router (set by the accounting middleware).
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// The router's routes over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), account))
        .with_state(state)
}

/// Builds the state from `config`, probes the instances once, and serves `listener` until
/// `shutdown` resolves (in-flight requests then finish).
pub async fn serve(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    serve_state(AppState::new(config)?, listener, shutdown).await
}

/// [`serve`] over an already built state.
pub async fn serve_state(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    health::probe_all(&state).await;
    let health_task = tokio::spawn(health::run(state.clone()));
    // Token streams are many small writes: without TCP_NODELAY, Nagle's algorithm meets the
    // client's delayed ACK and adds ~40 ms to inter-token gaps.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    health_task.abort();
    served.map_err(RouterError::Io)
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// Stamps the arrival time and counts the answer by endpoint and status.
async fn account(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(Arrival(Instant::now()));
    let endpoint = endpoint_label(request.uri().path());
    let response = next.run(request).await;
    state
        .metrics
        .request_answered(endpoint, response.status().as_u16());
    response
}

/// Bearer-key check on `/v1/*` when keys are configured.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let keys = &state.config.api_keys;
    if !keys.is_empty() {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !presented.is_some_and(|k| keys.iter().any(|key| key == k)) {
            return Err(
                ApiError::new(ErrorKind::Authentication, "invalid or missing API key")
                    .with_code("invalid_api_key"),
            );
        }
    }
    Ok(next.run(request).await)
}

fn arrival(ext: Option<Extension<Arrival>>) -> Instant {
    ext.map_or_else(Instant::now, |Extension(a)| a.0)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    at: Option<Extension<Arrival>>,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    generate::chat(&state, request, arrival(at))
        .await
        .map(reply_response)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    at: Option<Extension<Arrival>>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    generate::completion(&state, request, arrival(at))
        .await
        .map(reply_response)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(state.models())
}

async fn health(State(state): State<Arc<AppState>>) -> Result<Json<HealthResponse>, ApiError> {
    state.ready().map(|()| Json(HealthResponse::ok()))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

fn with_headers(mut response: Response, headers: Vec<(&'static str, String)>) -> Response {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), v);
        }
    }
    response
}

fn reply_response(reply: Reply) -> Response {
    match reply {
        Reply::Full { headers, body } => with_headers(Json(body).into_response(), headers),
        Reply::Stream { headers, events } => {
            let stream = futures::stream::unfold(events, |mut rx| async move {
                rx.recv().await.map(|data| (data, rx))
            })
            .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
            with_headers(Sse::new(stream).into_response(), headers)
        }
    }
}
