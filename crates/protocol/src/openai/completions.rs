//! `/v1/completions`: request, response and streaming chunk.

use serde::{Deserialize, Serialize};

use super::{CompletionLogprobs, FinishReason, ResponseExtension, StopSpec, StreamOptions, Usage};

/// A text completion request as sent by the client (validated by
/// [`crate::params::validate_completion`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Model name; must be the served model (optional: defaults to it).
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt(s).
    #[serde(default)]
    pub prompt: Option<PromptInput>,
    /// Maximum tokens to generate per choice.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature in [0, 2]; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling; -1 or 0 disables (vLLM extension).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Seed; choice `i` of a prompt's `n` uses `seed + i`.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings (at most 4).
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Stop token ids (vLLM extension).
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<i64>,
    /// Number of alternatives per position (0..=20); presence requests logprobs.
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options (only with `stream: true`).
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence (vLLM extension).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Minimum tokens before any stop condition but `max_tokens` (vLLM extension).
    #[serde(default)]
    pub min_tokens: Option<i64>,
    /// Not supported: rejected when true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported: rejected unless equal to `n`.
    #[serde(default)]
    pub best_of: Option<i64>,
    /// Not supported: rejected unless empty.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Not supported: rejected unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Not supported: rejected unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported: rejected unless empty.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `prompt`: text, texts, token ids, or lists of token ids. Several prompts produce
/// `prompts × n` choices, choice index = `prompt_index × n + i`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// Several text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenBatches(Vec<Vec<u32>>),
}

/// Non-streaming completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One per generated choice, by index.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
    /// pdserve extension: placement and stage timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdserve: Option<ResponseExtension>,
}

/// One completion choice (also the element of a streamed chunk, where `finish_reason` may be null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: u32,
    /// Generated text (stop string excluded), or the delta in a chunk.
    pub text: String,
    /// Logprobs, or null when not requested.
    pub logprobs: Option<CompletionLogprobs>,
    /// Why generation stopped (null in a non-final chunk).
    pub finish_reason: Option<FinishReason>,
}

/// One SSE chunk of a streamed completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    /// Same id on every chunk.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Deltas (empty in the final usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// With `include_usage`: null on every chunk but the last, which carries the totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// pdserve extension, on the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdserve: Option<ResponseExtension>,
}
