//! OpenAI-compatible wire types shared by `/v1/chat/completions`, `/v1/completions` and `/v1/models`.
//!
//! Requests are lenient the way OpenAI is: unknown fields are accepted and ignored (no
//! `deny_unknown_fields`), every optional field may be `null`. Numeric fields whose range is checked
//! by validation are deserialized as wide integers (`i64`) so that `0` or `-1` reach validation and
//! get a message naming the parameter instead of a serde type error. Responses serialize the way
//! OpenAI clients expect (`logprobs: null` when not requested, `usage` present when due).

pub mod chat;
pub mod completions;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum StopSpec {
    /// A single stop string.
    One(String),
    /// Up to the configured number of stop strings.
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s.clone()],
            StopSpec::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage` (and `usage: null` on every other chunk).
    #[serde(default)]
    pub include_usage: bool,
}

/// Why a choice stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop string, a stop token id, or end of sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// `usage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt(s), each prompt counted once whatever `n` is.
    pub prompt_tokens: u64,
    /// Tokens generated over all choices.
    pub completion_tokens: u64,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u64,
    /// Prompt-cache detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// Usage from counts, with `total_tokens` derived.
    pub fn new(prompt_tokens: u64, completion_tokens: u64, cached_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefill instance's prefix cache.
    pub cached_tokens: u64,
}

/// Chat-format logprobs of a choice: `{"content": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated token, in order.
    pub content: Vec<ChatTokenLogprob>,
}

/// One token's log probability in chat format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// The token's text (lossy UTF-8 of `bytes`).
    pub token: String,
    /// Natural-log probability of the token.
    pub logprob: f32,
    /// The token's raw bytes (a token may hold part of a multi-byte character).
    pub bytes: Vec<u8>,
    /// The most likely alternatives at this position, best first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// An alternative token in chat format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
}

/// Completions-format logprobs of a choice (parallel arrays).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Log probability of each token.
    pub token_logprobs: Vec<f32>,
    /// Per position: alternative token text → logprob, best first.
    pub top_logprobs: Vec<TopLogprobMap>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<u32>,
}

/// An ordered `{token: logprob}` object (order is best first; a JSON object keeps it on the wire).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for TopLogprobMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TopLogprobMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of token → logprob")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = access.next_entry::<String, f32>()? {
                    entries.push((k, v));
                }
                Ok(TopLogprobMap(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    /// The served models.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name clients put in `model`.
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// Unix seconds when the router started serving it.
    pub created: u64,
    /// Always `"pdserve"`.
    pub owned_by: String,
    /// Context length (prompt + completion tokens) accepted by the router.
    pub max_model_len: u32,
    /// pdserve extension: what is simulated and at which pace.
    pub pdserve: ModelSimulation,
}

/// `pdserve` extension of a model card. Fields are `null` when no instance reported them and the
/// router config does not set them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSimulation {
    /// Hardware profile name, e.g. `h800`.
    pub hardware: Option<String>,
    /// Wall seconds per simulated second (0 = no pacing).
    pub time_scale: Option<f64>,
    /// The model whose shape the timing models, e.g. `deepseek-v3`.
    pub modeled_model: Option<String>,
    /// Fabric model mode.
    pub mode: Option<SimMode>,
}

/// The fabric model's mode (see DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimMode {
    /// The paper's assumptions exactly.
    Analysis,
    /// Topology, contention, latency and compute cost.
    Detailed,
}

/// `pdserve` extension of a completion response (body and final SSE chunk): where each choice ran and
/// how long each stage took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseExtension {
    /// One report per generated choice, ordered by choice index.
    pub generations: Vec<GenerationReport>,
}

/// Placement and timings of one generated choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// Choice index.
    pub index: u32,
    /// Prefill instance whose result was used (null if the prefill answer was lost after decode
    /// had already started).
    pub prefill_instance: Option<String>,
    /// Decode instance.
    pub decode_instance: String,
    /// Prefill attempts made (1 = no retry).
    pub prefill_attempts: u32,
    /// Per-stage timings.
    pub timings: StageTimings,
}

/// Per-stage wall times in seconds, measured at the router except where noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    /// Router work before dispatch: parse, validate, tokenize, select instances.
    pub router_s: f64,
    /// Time queued at the prefill instance (reported by prefill).
    pub queue_s: Option<f64>,
    /// Prefill compute, paced (reported by prefill).
    pub prefill_s: Option<f64>,
    /// KV transfer to decode (reported by prefill).
    pub transfer_s: Option<f64>,
    /// Simulated prefill time before `time_scale` (reported by prefill).
    pub simulated_prefill_s: Option<f64>,
    /// Request arrival to first token received from decode.
    pub first_token_s: Option<f64>,
    /// First token to last token.
    pub decode_s: Option<f64>,
    /// Request arrival to end of generation.
    pub e2e_s: Option<f64>,
}
