//! The internal API between the router and the prefill / decode instances (JSON over HTTP), the
//! contract that the services implement. docs/api.md ("Internal API") is the prose version.
//!
//! One generation, in order:
//!
//! 1. router → decode `POST /internal/decode` ([`DecodeRequest`]). The decode instance registers
//!    `request_id` as waiting for KV **before** it sends the response head (status 200,
//!    `content-type: application/x-ndjson`), then streams [`DecodeEvent`]s, one JSON object per
//!    line. The router sends the prefill leg only after that head arrived, so the KV can never
//!    arrive for an unknown request.
//! 2. router → prefill `POST /internal/prefill` ([`PrefillRequest`]). The prefill instance runs the
//!    prompt, samples the first token, pushes a KV frame (see [`crate::kv_frame`]) carrying the
//!    latent KV and the first token to `decode.kv_addr` over TCP, and answers [`PrefillResponse`]
//!    once the frame is written. KV never passes through the router.
//! 3. The decode instance, on receiving the frame, admits the request, emits the first token (from
//!    the frame) as its first `tokens` event, then the rest, then `done`.
//!
//! Invariants the services keep:
//! - the decode instance accepts the first complete, valid frame for a registered `request_id` and
//!   drops later duplicates (a retried prefill may race an aborted one);
//! - if no frame arrives within `kv_timeout_ms` of registration, the decode stream ends with an
//!   `error` event of kind `kv_timeout`;
//! - every stream ends with exactly one `done` or one `error` event; `tokens` events carry at least
//!   one id; the generation's last `tokens` event has a `finish_reason`;
//! - `POST /internal/abort` is idempotent and frees whatever the request holds (queue slot, KV
//!   blocks, pending transfer); aborting an unknown id is not an error.
//!
//! Errors of the JSON endpoints use the same envelope as the public API ([`crate::ErrorEnvelope`]).

use serde::{Deserialize, Serialize};

use crate::openai::{FinishReason, SimMode};
use crate::params::{SamplingParams, StopParams};

/// Path of the prefill endpoint.
pub const PREFILL_PATH: &str = "/internal/prefill";
/// Path of the decode endpoint.
pub const DECODE_PATH: &str = "/internal/decode";
/// Path of the abort endpoint (both roles).
pub const ABORT_PATH: &str = "/internal/abort";
/// Path of the stats endpoint (both roles).
pub const STATS_PATH: &str = "/internal/stats";
/// Path of the liveness endpoint (both roles, and the router).
pub const HEALTH_PATH: &str = "/health";
/// Content type of the decode event stream.
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// Where the prefill instance must push the KV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeTarget {
    /// The decode instance's id (as in its [`InstanceStats`]).
    pub instance_id: String,
    /// `host:port` of the decode instance's KV receiver.
    pub kv_addr: String,
}

/// `POST /internal/prefill` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    /// Unique per generation; names the KV frame and the decode registration.
    pub request_id: String,
    /// The full prompt.
    pub prompt_token_ids: Vec<u32>,
    /// Sampling of the first token (and its seed, carried on to decode in the frame).
    pub sampling: SamplingParams,
    /// Token-level stops; prefill honours `min_tokens`/`ignore_eos` when sampling the first token
    /// (EOS and stop ids are masked if `min_tokens ≥ 1`).
    pub stop: StopParams,
    /// The decode instance that receives the KV.
    pub decode: DecodeTarget,
}

/// A sampled token with its log probability and the best alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    /// Token id.
    pub id: u32,
    /// Natural-log probability under the sampling distribution's logits (before temperature).
    pub logprob: f32,
    /// `sampling.logprobs = Some(k)`: the k most likely tokens, best first; empty otherwise.
    #[serde(default)]
    pub top_logprobs: Vec<TopToken>,
}

/// One alternative token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopToken {
    /// Token id.
    pub id: u32,
    /// Natural-log probability.
    pub logprob: f32,
}

/// Prefill-side stage times, wall seconds (paced, i.e. simulated × time_scale) unless noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefillTimings {
    /// Waiting in the prefill queue before the first chunk was scheduled.
    pub queue_s: f64,
    /// First scheduled chunk to first token sampled.
    pub prefill_s: f64,
    /// KV frame push to the decode instance (start to last byte written).
    pub transfer_s: f64,
    /// The simulated prefill time, before `time_scale`.
    pub simulated_prefill_s: f64,
}

/// `POST /internal/prefill` answer (200), sent after the KV frame was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillResponse {
    /// Echo of the request id.
    pub request_id: String,
    /// The first generated token (also inside the KV frame).
    pub first_token: SampledToken,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefill prefix cache.
    pub cached_tokens: u32,
    /// Stage times.
    pub timings: PrefillTimings,
}

/// `POST /internal/decode` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeRequest {
    /// Must match the KV frame's request id.
    pub request_id: String,
    /// The full prompt: the decode instance checks it against the frame's token count and keeps it
    /// as the sequence's history (positions, prefix-cache keys, usage).
    pub prompt_token_ids: Vec<u32>,
    /// Sampling of every later token (the frame carries the seed state after the first).
    pub sampling: SamplingParams,
    /// Token-level stops; the first token counts towards `max_tokens` and `min_tokens`.
    pub stop: StopParams,
    /// How long to wait for the KV frame after registration before failing with `kv_timeout`.
    pub kv_timeout_ms: u64,
}

/// Per-token logprobs in a `tokens` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The sampled token's logprob.
    pub logprob: f32,
    /// The best alternatives, best first (length = `sampling.logprobs`).
    #[serde(default)]
    pub top_logprobs: Vec<TopToken>,
}

/// Decode-side usage, reported in `done`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeUsage {
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Tokens emitted, first token included.
    pub completion_tokens: u32,
}

/// Decode-side stage times, wall seconds unless noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeTimings {
    /// Registration to KV frame fully received.
    pub kv_wait_s: f64,
    /// KV received to admission into the running batch.
    pub queue_s: f64,
    /// Admission to the last token.
    pub decode_s: f64,
    /// The simulated decode time, before `time_scale`.
    pub simulated_decode_s: f64,
}

/// Why a decode stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeErrorKind {
    /// No KV frame within `kv_timeout_ms`.
    KvTimeout,
    /// A KV frame arrived but failed validation (checksum, shape, token count).
    KvInvalid,
    /// The instance cannot hold the request (KV pool exhausted and preemption impossible).
    Overloaded,
    /// The request was aborted.
    Aborted,
    /// Anything else (a bug or an engine failure).
    Internal,
    /// A kind this router version does not know.
    #[serde(other)]
    Unknown,
}

/// One line of the decode stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DecodeEvent {
    /// New tokens, in order. `logprobs`, when requested, has one entry per id.
    Tokens {
        /// Token ids.
        ids: Vec<u32>,
        /// Parallel to `ids` when `sampling.logprobs` is set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<Vec<TokenLogprob>>,
        /// Set on the last `tokens` event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<FinishReason>,
    },
    /// The generation failed; the stream ends.
    Error {
        /// Classification.
        kind: DecodeErrorKind,
        /// Operator-facing message.
        message: String,
    },
    /// The generation finished; the stream ends.
    Done {
        /// Token counts.
        usage: DecodeUsage,
        /// Stage times.
        timings: DecodeTimings,
    },
}

/// `POST /internal/abort` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRequest {
    /// The generation to abort.
    pub request_id: String,
}

/// `POST /internal/abort` answer (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortResponse {
    /// Echo.
    pub request_id: String,
    /// Whether the instance still held anything for it.
    pub found: bool,
}

/// Instance role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs prompts and pushes KV.
    Prefill,
    /// Receives KV and generates.
    Decode,
}

impl Role {
    /// `prefill` or `decode` (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// `GET /internal/stats` answer: load signals for the router's policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    /// Stable id (matches the router config's id).
    pub instance_id: String,
    /// Role.
    pub role: Role,
    /// Requests being computed (prefill: in the current batch; decode: in the running batch).
    pub running: u32,
    /// Requests queued (decode: includes those waiting for KV).
    pub waiting: u32,
    /// Fraction of KV blocks in use, 0..=1.
    pub kv_usage: f64,
    /// Free KV blocks (64 tokens each).
    pub kv_blocks_free: u64,
    /// Total KV blocks.
    pub kv_blocks_total: u64,
    /// Prompt tokens queued and not yet prefilled (prefill) / admitted (decode).
    pub queued_prompt_tokens: u64,
    /// Decode only: `host:port` of the KV receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_addr: Option<String>,
    /// Context length the instance accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
    /// Layers of the latent KV the instance caches: what a prefill instance pushes in its KV
    /// frames (`shape.layers`) and what a decode instance requires of them. An MTP layer
    /// (`engine.scheduler.spec_tokens` > 0) counts, so the router compares this across a prefill /
    /// decode pair before pairing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_layers: Option<u32>,
    /// What the instance simulates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim: Option<SimInfo>,
}

/// What an instance simulates (reported in stats, echoed by the router's `/v1/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimInfo {
    /// Hardware profile name, e.g. `h800`.
    pub hardware: String,
    /// Wall seconds per simulated second (0 = no pacing).
    pub time_scale: f64,
    /// The model whose shape the timing models.
    pub modeled_model: String,
    /// Fabric model mode.
    pub mode: SimMode,
}

/// `GET /health` answer (200 when the instance can take work).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `ok`.
    pub status: String,
}

impl HealthResponse {
    /// The healthy answer.
    pub fn ok() -> HealthResponse {
        HealthResponse {
            status: "ok".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_events_are_tagged_lines() {
        let ev = DecodeEvent::Tokens {
            ids: vec![5, 6],
            logprobs: None,
            finish_reason: Some(FinishReason::Length),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            line,
            r#"{"event":"tokens","ids":[5,6],"finish_reason":"length"}"#
        );
        let back: DecodeEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, ev);
        let err: DecodeEvent =
            serde_json::from_str(r#"{"event":"error","kind":"brand_new","message":"m"}"#).unwrap();
        assert!(matches!(
            err,
            DecodeEvent::Error {
                kind: DecodeErrorKind::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn stats_tolerate_missing_optional_fields() {
        let s: InstanceStats = serde_json::from_str(
            r#"{"instance_id":"d0","role":"decode","running":1,"waiting":0,"kv_usage":0.5,
                "kv_blocks_free":10,"kv_blocks_total":20,"queued_prompt_tokens":0}"#,
        )
        .unwrap();
        assert_eq!(s.kv_addr, None);
        assert_eq!(s.kv_layers, None);
        assert_eq!(s.role, Role::Decode);
    }
}
