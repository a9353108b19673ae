//! Validation of OpenAI requests into typed generation parameters.
//!
//! Two phases, because one limit depends on the prompt's token count:
//!
//! 1. [`validate_chat`] / [`validate_completion`] check every field that does not need the tokenizer
//!    and produce a [`ValidatedChat`] / [`ValidatedCompletion`] holding [`GenerationParams`];
//! 2. after tokenization, [`GenerationParams::stop_params`] checks the context limit and fixes
//!    `max_tokens` into the [`StopParams`] sent to the prefill and decode services.
//!
//! Invariants of the output: `temperature ∈ [0, 2]`, `top_p ∈ (0, 1]`, `top_k` is `None` (off) or
//! ≥ 1, `logprobs ≤ max_top_logprobs`, `1 ≤ n ≤ max_n`, at most `max_stop_strings` non-empty stop
//! strings, and after phase 2 `1 ≤ max_tokens`, `min_tokens ≤ max_tokens`,
//! `prompt + max_tokens ≤ context`. Every error is a 400 naming the `param` at fault.
//!
//! Division of labour (see docs/api.md): stop *strings* are applied by the router, which owns the
//! tokenizer and the detokenizer; everything expressed in token ids (EOS, `stop_token_ids`,
//! `min_tokens`, `max_tokens`) is applied by the services, so [`StopParams`] carries no strings.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::openai::StopSpec;
use crate::openai::chat::{ChatCompletionRequest, MessageContent};
use crate::openai::completions::{CompletionRequest, PromptInput};

/// Sampling parameters of one generation, as sent to prefill and decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Temperature in [0, 2]; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Top-k; `None` disables.
    pub top_k: Option<u32>,
    /// Seed of this generation's sampler; `None` lets the service draw one.
    pub seed: Option<u64>,
    /// `Some(k)`: return the sampled token's logprob and the `k` best alternatives.
    pub logprobs: Option<u8>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// The parameters of choice `offset` of a fan-out: the seed advances by `offset`.
    pub fn for_choice(&self, offset: u32) -> SamplingParams {
        SamplingParams {
            seed: self.seed.map(|s| s.wrapping_add(u64::from(offset))),
            ..self.clone()
        }
    }
}

/// Token-level stop conditions, applied by the services (stop strings are the router's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopParams {
    /// Generate at most this many tokens (≥ 1); the first token, sampled by prefill, counts.
    pub max_tokens: u32,
    /// Sampling one of these ends the generation with `finish_reason: stop` (the token is
    /// emitted).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence token.
    pub ignore_eos: bool,
    /// EOS and `stop_token_ids` cannot end the generation before this many tokens (the services
    /// mask them while sampling, as vLLM does).
    pub min_tokens: u32,
}

/// Limits that validation enforces; come from the router config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `n`.
    pub max_n: u32,
    /// Largest accepted `top_logprobs` (chat) / `logprobs` (completions).
    pub max_top_logprobs: u8,
    /// Largest number of stop strings.
    pub max_stop_strings: usize,
    /// Context length: prompt + completion tokens.
    pub max_context_tokens: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_n: 16,
            max_top_logprobs: 20,
            max_stop_strings: 4,
            max_context_tokens: 4096,
        }
    }
}

/// Validated, tokenizer-independent generation parameters of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Sampling of choice 0 (choice `i` uses [`SamplingParams::for_choice`]).
    pub sampling: SamplingParams,
    /// Requested completion budget; `None`: the rest of the context.
    pub max_tokens: Option<u32>,
    /// Which field carried `max_tokens` (for error messages).
    pub max_tokens_param: &'static str,
    /// Minimum completion tokens.
    pub min_tokens: u32,
    /// Stop strings (applied by the router).
    pub stop_strings: Vec<String>,
    /// Stop token ids (applied by the services).
    pub stop_token_ids: Vec<u32>,
    /// Ignore end-of-sequence.
    pub ignore_eos: bool,
    /// Choices per prompt.
    pub n: u32,
    /// Stream as SSE.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
}

impl GenerationParams {
    /// Phase 2: checks the prompt against the context and fixes `max_tokens`. `prompt_param` names
    /// the field that carried the prompt (`messages` or `prompt`).
    pub fn stop_params(
        &self,
        prompt_tokens: usize,
        limits: &Limits,
        prompt_param: &str,
    ) -> Result<StopParams, ApiError> {
        let context = u64::from(limits.max_context_tokens);
        let prompt = prompt_tokens as u64;
        if prompt == 0 {
            return Err(ApiError::invalid_param(
                prompt_param,
                "the prompt is empty after tokenization",
            ));
        }
        if prompt >= context {
            return Err(ApiError::invalid_param(
                prompt_param,
                format!(
                    "the prompt has {prompt} tokens; the context length is {context} tokens, \
                     leaving no room for a completion"
                ),
            ));
        }
        let room = context - prompt;
        let max_tokens = match self.max_tokens {
            Some(m) if u64::from(m) > room => {
                return Err(ApiError::invalid_param(
                    self.max_tokens_param,
                    format!(
                        "{} is {m}, but the prompt has {prompt} tokens and the context length is \
                         {context} tokens (at most {room} can be generated)",
                        self.max_tokens_param
                    ),
                ));
            }
            Some(m) => m,
            // room < context ≤ u32::MAX
            None => u32::try_from(room).unwrap_or(u32::MAX),
        };
        if self.min_tokens > max_tokens {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed the completion budget ({max_tokens})",
                    self.min_tokens
                ),
            ));
        }
        Ok(StopParams {
            max_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
        })
    }
}

/// A chat message's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// System prompt.
    System,
    /// OpenAI's successor of `system`; rendered as `system` by the chat template.
    Developer,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

impl Role {
    /// Parses an OpenAI role name.
    pub fn parse(role: &str) -> Option<Role> {
        match role {
            "system" => Some(Role::System),
            "developer" => Some(Role::Developer),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }

    /// The role name a chat template sees (`developer` is presented as `system`).
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One validated chat message, content flattened to text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    /// Role.
    pub role: Role,
    /// Text (parts joined with `\n`).
    pub content: String,
    /// Optional participant name.
    pub name: Option<String>,
    /// For tool messages.
    pub tool_call_id: Option<String>,
}

/// A validated chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedChat {
    /// Requested model, if any.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatTurn>,
    /// Generation parameters.
    pub params: GenerationParams,
}

/// One prompt of a completion request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, to be tokenized.
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// A validated completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedCompletion {
    /// Requested model, if any.
    pub model: Option<String>,
    /// One or more prompts (each yields `n` choices).
    pub prompts: Vec<Prompt>,
    /// Generation parameters.
    pub params: GenerationParams,
}

/// Fields common to chat and completions, borrowed for validation.
struct CommonFields<'a> {
    max_tokens: Option<(i64, &'static str)>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<&'a StopSpec>,
    stop_token_ids: Option<&'a Vec<u32>>,
    n: Option<i64>,
    logprobs: Option<(i64, &'static str)>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    ignore_eos: Option<bool>,
    min_tokens: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias_len: usize,
}

fn validate_common(f: CommonFields<'_>, limits: &Limits) -> Result<GenerationParams, ApiError> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k < -1 => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (off), 0 (off) or positive, got {k}"),
            ));
        }
        Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
    };
    let n = f.n.unwrap_or(1);
    if n < 1 || n > i64::from(limits.max_n) {
        return Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {}, got {n}", limits.max_n),
        ));
    }
    let max_tokens = match f.max_tokens {
        None => None,
        Some((m, param)) if m < 1 => {
            return Err(ApiError::invalid_param(
                param,
                format!("{param} must be at least 1, got {m}"),
            ));
        }
        Some((m, _)) => Some(u32::try_from(m).unwrap_or(u32::MAX)),
    };
    let min_tokens = match f.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!("min_tokens must be non-negative, got {m}"),
            ));
        }
        Some(m) => u32::try_from(m).unwrap_or(u32::MAX),
    };
    let logprobs = match f.logprobs {
        None => None,
        Some((k, param)) if k < 0 || k > i64::from(limits.max_top_logprobs) => {
            return Err(ApiError::invalid_param(
                param,
                format!(
                    "{param} must be between 0 and {}, got {k}",
                    limits.max_top_logprobs
                ),
            ));
        }
        Some((k, _)) => Some(u8::try_from(k).unwrap_or(u8::MAX)),
    };
    let stop_strings = f.stop.map(StopSpec::to_vec).unwrap_or_default();
    if stop_strings.len() > limits.max_stop_strings {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "at most {} stop sequences are allowed, got {}",
                limits.max_stop_strings,
                stop_strings.len()
            ),
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    let stream = f.stream.unwrap_or(false);
    if f.include_usage.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    for (param, value) in [
        ("presence_penalty", f.presence_penalty),
        ("frequency_penalty", f.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid_param(
                param,
                format!("{param} is not supported (only 0)"),
            ));
        }
    }
    if f.logit_bias_len > 0 {
        return Err(ApiError::invalid_param(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    Ok(GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: f.seed.map(|s| s as u64),
            logprobs,
        },
        max_tokens,
        max_tokens_param: f.max_tokens.map_or("max_tokens", |(_, p)| p),
        min_tokens,
        stop_strings,
        stop_token_ids: f.stop_token_ids.cloned().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        n: u32::try_from(n).unwrap_or(1),
        stream,
        include_usage: f.include_usage.unwrap_or(false),
    })
}

/// Phase 1 validation of a chat request.
pub fn validate_chat(
    req: &ChatCompletionRequest,
    limits: &Limits,
) -> Result<ValidatedChat, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = Role::parse(&m.role).ok_or_else(|| {
            ApiError::invalid_param(
                format!("messages[{i}].role"),
                format!(
                    "unknown role `{}`; expected system, developer, user, assistant or tool",
                    m.role
                ),
            )
        })?;
        let content = match &m.content {
            None if role == Role::Assistant => String::new(),
            None => {
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].content"),
                    format!("a {} message needs content", m.role),
                ));
            }
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    match (p.part_type.as_str(), &p.text) {
                        ("text", Some(t)) => texts.push(t.as_str()),
                        ("text", None) => {
                            return Err(ApiError::invalid_param(
                                format!("messages[{i}].content[{j}].text"),
                                "a text part needs `text`",
                            ));
                        }
                        (other, _) => {
                            return Err(ApiError::invalid_param(
                                format!("messages[{i}].content[{j}].type"),
                                format!("content part type `{other}` is not supported (only text)"),
                            ));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        messages.push(ChatTurn {
            role,
            content,
            name: m.name.clone(),
            tool_call_id: m.tool_call_id.clone(),
        });
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid_param("tools", "tools are not supported"));
    }
    if let Some(format) = &req.response_format {
        let kind = format.get("type").and_then(|t| t.as_str());
        if kind != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some((top.unwrap_or(0), "top_logprobs")),
        (_, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ));
        }
        _ => None,
    };
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let params = validate_common(
        CommonFields {
            max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop.as_ref(),
            stop_token_ids: req.stop_token_ids.as_ref(),
            n: req.n,
            logprobs,
            stream: req.stream,
            include_usage: req.stream_options.as_ref().map(|o| o.include_usage),
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            logit_bias_len: req.logit_bias.as_ref().map_or(0, |b| b.len()),
        },
        limits,
    )?;
    Ok(ValidatedChat {
        model: req.model.clone(),
        messages,
        params,
    })
}

/// Phase 1 validation of a completion request.
pub fn validate_completion(
    req: &CompletionRequest,
    limits: &Limits,
) -> Result<ValidatedCompletion, ApiError> {
    let prompts = match &req.prompt {
        None => return Err(ApiError::invalid_param("prompt", "prompt is required")),
        Some(PromptInput::Text(t)) => vec![Prompt::Text(t.clone())],
        Some(PromptInput::Texts(v)) => v.iter().cloned().map(Prompt::Text).collect(),
        Some(PromptInput::Tokens(v)) => vec![Prompt::Tokens(v.clone())],
        Some(PromptInput::TokenBatches(v)) => v.iter().cloned().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be empty",
        ));
    }
    if req.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let params = validate_common(
        CommonFields {
            max_tokens: req.max_tokens.map(|m| (m, "max_tokens")),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop.as_ref(),
            stop_token_ids: req.stop_token_ids.as_ref(),
            n: req.n,
            logprobs: req.logprobs.map(|k| (k, "logprobs")),
            stream: req.stream,
            include_usage: req.stream_options.as_ref().map(|o| o.include_usage),
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            logit_bias_len: req.logit_bias.as_ref().map_or(0, |b| b.len()),
        },
        limits,
    )?;
    if let Some(best_of) = req.best_of
        && best_of != i64::from(params.n)
    {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of is not supported (only equal to n)",
        ));
    }
    if prompts.len() as u64 * u64::from(params.n) > u64::from(limits.max_n) {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "{} prompts × n = {} exceeds the limit of {} choices",
                prompts.len(),
                prompts.len() as u64 * u64::from(params.n),
                limits.max_n
            ),
        ));
    }
    Ok(ValidatedCompletion {
        model: req.model.clone(),
        prompts,
        params,
    })
}

#[cfg(test)]
#[path = "params_tests.rs"]
mod tests;
