//! axum glue: the one place where an [`ApiError`] becomes an HTTP response, and a JSON extractor
//! whose every rejection is that same envelope (axum's own `Json` rejects with plain text).
//!
//! Invariant: a pdserve service never answers an error with anything but
//! `{"error":{"message","type","param","code"}}`; handlers return `Result<_, ApiError>` and use
//! [`ApiJson`] for bodies, routers use [`not_found`] / [`method_not_allowed`] as fallbacks.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorKind, decode_json};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let diagnostic = self.diagnostic.as_deref().unwrap_or("");
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), message = %self.message, %diagnostic, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), message = %self.message, %diagnostic, "request rejected");
        }
        (status, axum::Json(self.envelope())).into_response()
    }
}

/// JSON body extractor: invalid UTF-8, malformed JSON, wrong types → 400 envelope naming the path
/// at fault; a body over the `DefaultBodyLimit` → 413 envelope. The content type is not checked
/// (clients of OpenAI servers are not always careful with it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        ErrorKind::PayloadTooLarge,
                        "request body exceeds the size limit",
                    )
                    .with_code("request_too_large")
                    .with_diagnostic(rejection.body_text())
                } else {
                    ApiError::invalid_request("could not read the request body")
                        .with_diagnostic(rejection.body_text())
                }
            })?;
        decode_json(&bytes).map(ApiJson)
    }
}

/// Fallback for unknown routes: 404 envelope.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no route for {}", uri.path()))
        .with_code("not_found")
}

/// Fallback for a known route with the wrong method: 405 envelope.
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("method {method} is not allowed on this route"),
    )
    .with_code("method_not_allowed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::DefaultBodyLimit;
    use axum::routing::post;
    use tower::ServiceExt;

    #[derive(Debug, serde::Deserialize)]
    struct Body1 {
        x: u32,
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/",
                post(|ApiJson(b): ApiJson<Body1>| async move { b.x.to_string() }),
            )
            .layer(DefaultBodyLimit::max(64))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
    }

    async fn call(req: axum::http::Request<Body>) -> (u16, serde_json::Value) {
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    fn post_body(body: impl Into<Body>) -> axum::http::Request<Body> {
        axum::http::Request::post("/").body(body.into()).unwrap()
    }

    #[tokio::test]
    async fn every_rejection_is_the_envelope() {
        let (s, j) = call(post_body("{\"x\": \"one\"}")).await;
        assert_eq!(s, 400);
        assert_eq!(j["error"]["param"], "x");
        assert_eq!(j["error"]["type"], "invalid_request_error");

        let (s, j) = call(post_body("{")).await;
        assert_eq!(s, 400);
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains("malformed")
        );

        let (s, j) = call(post_body(vec![b'"', 0xff, b'"'])).await;
        assert_eq!(s, 400);
        assert!(j["error"]["message"].as_str().unwrap().contains("UTF-8"));

        let (s, j) = call(post_body(format!(
            "{{\"x\": 1, \"pad\": \"{}\"}}",
            "a".repeat(100)
        )))
        .await;
        assert_eq!(s, 413);
        assert_eq!(j["error"]["code"], "request_too_large");

        let (s, j) = call(
            axum::http::Request::get("/nope")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(s, 404);
        assert_eq!(j["error"]["code"], "not_found");

        let (s, j) = call(axum::http::Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(s, 405);
        assert!(j["error"]["message"].is_string());
    }

    #[tokio::test]
    async fn a_valid_body_reaches_the_handler() {
        let resp = app()
            .oneshot(post_body("{\"x\": 7, \"extra\": true}"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}
