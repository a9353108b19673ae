//! pdserve's wire types: the OpenAI-compatible API, the internal prefill/decode API, the KV frame,
//! and the one error envelope.
//!
//! Principal types:
//! - [`openai::chat::ChatCompletionRequest`], [`openai::completions::CompletionRequest`] and their
//!   responses and SSE chunks; [`openai::ModelList`];
//! - [`params::validate_chat`] / [`params::validate_completion`] → [`params::GenerationParams`] →
//!   ([`params::SamplingParams`], [`params::StopParams`]), the typed request the services see;
//! - [`internal::PrefillRequest`], [`internal::DecodeRequest`], [`internal::DecodeEvent`],
//!   [`internal::InstanceStats`]: the router ↔ instance contract (docs/api.md, "Internal API");
//! - [`kv_frame::encode_frame`] / [`kv_frame::decode_frame`]: the prefill → decode KV frame;
//! - [`ApiError`]: every failure, rendered as `{"error":{"message","type","param","code"}}` in one
//!   place (feature `axum`: `impl IntoResponse`, plus the [`http::ApiJson`] extractor).
//!
//! ```
//! use pdserve_protocol::openai::chat::ChatCompletionRequest;
//! use pdserve_protocol::params::{validate_chat, Limits};
//! use pdserve_protocol::{decode_json, ApiError};
//!
//! let body = br#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
//!                 "max_tokens": 8, "temperature": 0}"#;
//! let req: ChatCompletionRequest = decode_json(body)?;
//! let chat = validate_chat(&req, &Limits::default())?;
//! let stop = chat.params.stop_params(12, &Limits::default(), "messages")?;
//! assert_eq!(stop.max_tokens, 8);
//!
//! let err = decode_json::<ChatCompletionRequest>(br#"{"messages": 3}"#).unwrap_err();
//! assert_eq!(err.status(), 400);
//! assert_eq!(err.param.as_deref(), Some("messages"));
//! # Ok::<(), ApiError>(())
//! ```

pub mod error;
#[cfg(feature = "axum")]
pub mod http;
pub mod internal;
pub mod kv_frame;
pub mod metrics;
pub mod openai;
pub mod params;

pub use error::{ApiError, ErrorBody, ErrorEnvelope, ErrorKind, decode_json};
