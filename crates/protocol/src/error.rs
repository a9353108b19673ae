//! The one error type of every pdserve HTTP service and its OpenAI wire envelope.
//!
//! An [`ApiError`] is classified once, where its cause is understood, into an [`ErrorKind`] that fixes
//! the HTTP status and the OpenAI `type`. It carries two texts:
//!
//! - `message`: safe to show to the client (no addresses, no instance internals);
//! - `diagnostic`: for the operator only; logged where the error is rendered, never sent.
//!
//! Invariant: the wire form is always `{"error":{"message","type","param","code"}}` (`param` and
//! `code` are `null` when absent), produced by [`ApiError::envelope`]. The HTTP rendering (status +
//! envelope + logging of the diagnostic) happens in exactly one place, the `IntoResponse` impl in
//! `http.rs`; a streamed error (SSE `data:` line) serializes the same envelope.

use serde::{Deserialize, Serialize};

/// What went wrong, as far as the client is concerned; fixes status and OpenAI `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the request is malformed or a parameter is out of range.
    InvalidRequest,
    /// 401: missing or wrong API key.
    Authentication,
    /// 404: unknown route or unknown model (`code: model_not_found`).
    NotFound,
    /// 405: the route exists but not for this method.
    MethodNotAllowed,
    /// 413: the request body exceeds the configured limit.
    PayloadTooLarge,
    /// 429: too many concurrent requests.
    RateLimited,
    /// 500: a bug or an unexpected upstream answer.
    Internal,
    /// 503: no healthy instance could take the request, or an instance refused it.
    Unavailable,
    /// 504: a stage (prefill, KV transfer, first token, inter-token, total) timed out.
    Timeout,
}

impl ErrorKind {
    /// HTTP status code for this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::RateLimited => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
        }
    }

    /// The OpenAI `error.type` string.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::PayloadTooLarge => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Internal => "server_error",
            ErrorKind::Unavailable => "service_unavailable_error",
            ErrorKind::Timeout => "timeout_error",
        }
    }

    /// Kind for an HTTP status received from another service (the inverse of [`ErrorKind::status`]).
    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::InvalidRequest,
            401 | 403 => ErrorKind::Authentication,
            404 => ErrorKind::NotFound,
            405 => ErrorKind::MethodNotAllowed,
            413 => ErrorKind::PayloadTooLarge,
            429 => ErrorKind::RateLimited,
            503 => ErrorKind::Unavailable,
            504 => ErrorKind::Timeout,
            _ => ErrorKind::Internal,
        }
    }
}

/// A classified error: client-safe message, optional offending parameter and code, operator detail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    /// Classification (status and `type`).
    pub kind: ErrorKind,
    /// Client-safe message.
    pub message: String,
    /// The request parameter at fault, e.g. `temperature` or `messages[1].role`.
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
    /// Operator-only detail (upstream address, raw upstream error); logged, never sent.
    pub diagnostic: Option<String>,
}

impl ApiError {
    /// An error of `kind` with a client-safe `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            code: None,
            diagnostic: None,
        }
    }

    /// 400 naming the parameter at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidRequest, message).with_param(param)
    }

    /// 400 without a specific parameter.
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidRequest, message)
    }

    /// 404 for a model this server does not serve.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError::new(
            ErrorKind::NotFound,
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 500 with a generic client message and the real cause as diagnostic.
    pub fn internal(diagnostic: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, "internal server error").with_diagnostic(diagnostic)
    }

    /// Sets `param`.
    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// Sets `code`.
    pub fn with_code(mut self, code: impl Into<String>) -> ApiError {
        self.code = Some(code.into());
        self
    }

    /// Sets the operator-only diagnostic.
    pub fn with_diagnostic(mut self, diagnostic: impl Into<String>) -> ApiError {
        self.diagnostic = Some(diagnostic.into());
        self
    }

    /// HTTP status code.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The wire envelope (never contains the diagnostic).
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                message: self.message.clone(),
                error_type: self.kind.error_type().to_string(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }

    /// Rebuilds an error from an envelope received from another pdserve service with `status`.
    /// The upstream message becomes the diagnostic; the client sees `client_message`.
    pub fn from_upstream(status: u16, envelope: &ErrorEnvelope, client_message: &str) -> ApiError {
        ApiError::new(ErrorKind::from_status(status), client_message).with_diagnostic(format!(
            "upstream status {status}: {} ({})",
            envelope.error.message, envelope.error.error_type
        ))
    }
}

/// `{"error": {...}}`, the OpenAI error envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error body.
    pub error: ErrorBody,
}

/// The body of [`ErrorEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Client-safe message.
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// Offending parameter, or null.
    pub param: Option<String>,
    /// Machine-readable code, or null.
    pub code: Option<String>,
}

/// Parses a JSON request body into `T`, classifying every failure as a 400 [`ApiError`]: invalid
/// UTF-8, malformed JSON, and wrong types (with `param` set to the JSON path at fault, e.g.
/// `messages[0].content`).
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid_request(format!(
            "request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("malformed JSON in request body: {inner}")
            }
            _ if path == "." || path.is_empty() => format!("invalid request body: {inner}"),
            _ => format!("invalid value for `{path}`: {inner}"),
        };
        let err = ApiError::invalid_request(message);
        match inner.classify() {
            serde_json::error::Category::Data if path != "." && !path.is_empty() => {
                err.with_param(path)
            }
            _ => err,
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_request(format!("malformed JSON in request body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[expect(dead_code, reason = "fields exist only to be deserialized")]
    struct Probe {
        temperature: Option<f32>,
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[expect(dead_code, reason = "fields exist only to be deserialized")]
    struct Inner {
        items: Vec<u32>,
    }

    #[test]
    fn envelope_has_null_param_and_code_when_absent() {
        let e = ApiError::new(ErrorKind::Unavailable, "no healthy instance");
        let json = serde_json::to_value(e.envelope()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "no healthy instance",
                "type": "service_unavailable_error", "param": null, "code": null}})
        );
    }

    #[test]
    fn envelope_never_contains_the_diagnostic() {
        let e = ApiError::internal("connect to 10.1.2.3:9000 refused");
        let text = serde_json::to_string(&e.envelope()).unwrap();
        assert!(!text.contains("10.1.2.3"));
        assert_eq!(e.status(), 500);
    }

    #[test]
    fn model_not_found_is_404_with_code() {
        let e = ApiError::model_not_found("gpt-x");
        assert_eq!(e.status(), 404);
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
        assert_eq!(e.param.as_deref(), Some("model"));
    }

    #[test]
    fn wrong_type_names_the_json_path() {
        let err = decode_json::<Probe>(br#"{"inner": {"items": [1, "x"]}}"#).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.param.as_deref(), Some("inner.items[1]"));
        let err = decode_json::<Probe>(br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn malformed_json_and_invalid_utf8_are_400() {
        let err = decode_json::<Probe>(b"{\"temperature\": 1,").unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert!(err.message.contains("malformed JSON"), "{}", err.message);
        let err = decode_json::<Probe>(b"{\"temperature\": \"\xff\"}").unwrap_err();
        assert!(err.message.contains("UTF-8"), "{}", err.message);
        let err = decode_json::<Probe>(b"{} trailing").unwrap_err();
        assert!(err.message.contains("malformed JSON"), "{}", err.message);
    }

    #[test]
    fn status_round_trips_through_from_status() {
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::Authentication,
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::PayloadTooLarge,
            ErrorKind::RateLimited,
            ErrorKind::Internal,
            ErrorKind::Unavailable,
            ErrorKind::Timeout,
        ] {
            assert_eq!(ErrorKind::from_status(kind.status()), kind);
        }
    }
}
