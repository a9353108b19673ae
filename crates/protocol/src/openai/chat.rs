//! `/v1/chat/completions`: request, response and streaming chunk.

use serde::{Deserialize, Serialize};

use super::{ChatLogprobs, FinishReason, ResponseExtension, StopSpec, StreamOptions, Usage};

/// A chat completion request as sent by the client (validated by
/// [`crate::params::validate_chat`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name; must be the served model (optional: defaults to it).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// Maximum tokens to generate (deprecated by OpenAI in favour of `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Maximum tokens to generate; wins over `max_tokens` when both are set.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature in [0, 2]; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling; -1 or 0 disables (vLLM extension).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Seed for reproducible sampling; choice `i` of `n` uses `seed + i`.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings (at most 4).
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Stop token ids (vLLM extension).
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Number of choices.
    #[serde(default)]
    pub n: Option<i64>,
    /// Return log probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per position (0..=20); requires `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options (only with `stream: true`).
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence (vLLM extension).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Generate at least this many tokens before EOS / stop tokens / stop strings may end the choice
    /// (vLLM extension).
    #[serde(default)]
    pub min_tokens: Option<i64>,
    /// Not supported: rejected unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Not supported: rejected unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported: rejected unless empty.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Not supported: rejected unless empty.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Not supported except `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

/// One message of the conversation. The role is kept as text so that an unknown role is reported by
/// validation with its index (`messages[i].role`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or an array of text parts; may be null for an assistant message.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name (accepted; the chat template decides whether to use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `tool` messages: the call answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// Message content: a string or an array of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type": "text", "text": ...}` is supported.
    Parts(Vec<ContentPart>),
}

/// One content part. Its `type` is kept as text so that an unsupported part type is reported by
/// validation with its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub part_type: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Non-streaming chat completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One per generated choice, by index.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// pdserve extension: placement and stage timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdserve: Option<ResponseExtension>,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Token logprobs, or null when not requested.
    pub logprobs: Option<ChatLogprobs>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// The generated assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// Generated text (stop string excluded).
    pub content: String,
}

/// One SSE chunk of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of the stream.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Deltas (empty in the final usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// With `include_usage`: null on every chunk but the last, which carries the totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// pdserve extension, on the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdserve: Option<ResponseExtension>,
}

/// One choice's delta within a chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: u32,
    /// New role and/or text.
    pub delta: ChatDelta,
    /// Logprobs of the tokens whose text this delta carries.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// A streamed message delta.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant`, on the first chunk of each choice only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}
