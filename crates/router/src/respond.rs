//! OpenAI response shapes for both endpoints: non-streaming bodies, SSE chunks, the `pdserve`
//! extension and its headers. Pure formatting; no I/O.

use pdserve_protocol::openai::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatDelta,
};
use pdserve_protocol::openai::completions::{
    CompletionChoice, CompletionChunk, CompletionResponse,
};
use pdserve_protocol::openai::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, FinishReason,
    ResponseExtension, StageTimings, TopLogprobMap, Usage,
};

use crate::assemble::TokenLogprobText;

/// Header: prefill instance of each choice, comma-separated by choice index (`-` when unknown).
pub const HEADER_PREFILL_INSTANCE: &str = "x-pdserve-prefill-instance";
/// Header: decode instance of each choice, comma-separated by choice index.
pub const HEADER_DECODE_INSTANCE: &str = "x-pdserve-decode-instance";
/// Header: stage timings of choice 0, `name=seconds` pairs.
pub const HEADER_TIMINGS: &str = "x-pdserve-timings";

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// Identity of one response.
#[derive(Debug, Clone)]
pub struct ResponseContext {
    /// Endpoint.
    pub endpoint: Endpoint,
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Logprobs were requested.
    pub want_logprobs: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// A finished choice, for the non-streaming body.
#[derive(Debug, Clone)]
pub struct ChoiceResult {
    /// Index.
    pub index: u32,
    /// Full text.
    pub text: String,
    /// All token logprobs (when requested).
    pub logprobs: Vec<TokenLogprobText>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

fn chat_logprobs(entries: &[TokenLogprobText]) -> ChatLogprobs {
    ChatLogprobs {
        content: entries
            .iter()
            .map(|e| ChatTokenLogprob {
                token: e.token.clone(),
                logprob: e.logprob,
                bytes: e.bytes.clone(),
                top_logprobs: e
                    .top
                    .iter()
                    .map(|(token, bytes, logprob)| ChatTopLogprob {
                        token: token.clone(),
                        logprob: *logprob,
                        bytes: bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn completion_logprobs(entries: &[TokenLogprobText]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: entries.iter().map(|e| e.token.clone()).collect(),
        token_logprobs: entries.iter().map(|e| e.logprob).collect(),
        top_logprobs: entries
            .iter()
            .map(|e| TopLogprobMap(e.top.iter().map(|(t, _, l)| (t.clone(), *l)).collect()))
            .collect(),
        text_offset: entries.iter().map(|e| e.text_offset).collect(),
    }
}

/// The non-streaming body.
pub fn full_body(
    ctx: &ResponseContext,
    choices: Vec<ChoiceResult>,
    usage: Usage,
    extension: ResponseExtension,
) -> Result<serde_json::Value, serde_json::Error> {
    match ctx.endpoint {
        Endpoint::Chat => serde_json::to_value(ChatCompletionResponse {
            id: ctx.id.clone(),
            object: "chat.completion".into(),
            created: ctx.created,
            model: ctx.model.clone(),
            choices: choices
                .into_iter()
                .map(|c| ChatChoice {
                    index: c.index,
                    logprobs: ctx.want_logprobs.then(|| chat_logprobs(&c.logprobs)),
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: c.text,
                    },
                    finish_reason: c.finish_reason,
                })
                .collect(),
            usage,
            pdserve: Some(extension),
        }),
        Endpoint::Completions => serde_json::to_value(CompletionResponse {
            id: ctx.id.clone(),
            object: "text_completion".into(),
            created: ctx.created,
            model: ctx.model.clone(),
            choices: choices
                .into_iter()
                .map(|c| CompletionChoice {
                    index: c.index,
                    logprobs: ctx.want_logprobs.then(|| completion_logprobs(&c.logprobs)),
                    text: c.text,
                    finish_reason: Some(c.finish_reason),
                })
                .collect(),
            usage,
            pdserve: Some(extension),
        }),
    }
}

/// One piece of a streamed choice.
#[derive(Debug, Clone)]
pub enum ChunkPart<'a> {
    /// The first chunk of a chat choice: the role.
    Role,
    /// New text and the logprobs of its tokens.
    Text(&'a str, &'a [TokenLogprobText]),
    /// The choice's end.
    Finish(FinishReason),
}

/// A streamed chunk for one choice, serialized. `extension` goes on the stream's last chunk.
pub fn chunk(
    ctx: &ResponseContext,
    index: u32,
    part: ChunkPart<'_>,
    extension: Option<ResponseExtension>,
) -> Result<String, serde_json::Error> {
    let usage = ctx.include_usage.then_some(None);
    match ctx.endpoint {
        Endpoint::Chat => {
            let (delta, logprobs, finish_reason) = match part {
                ChunkPart::Role => (
                    ChatDelta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    None,
                    None,
                ),
                ChunkPart::Text(text, lps) => (
                    ChatDelta {
                        role: None,
                        content: Some(text.to_string()),
                    },
                    ctx.want_logprobs.then(|| chat_logprobs(lps)),
                    None,
                ),
                ChunkPart::Finish(reason) => (ChatDelta::default(), None, Some(reason)),
            };
            serde_json::to_string(&ChatCompletionChunk {
                id: ctx.id.clone(),
                object: "chat.completion.chunk".into(),
                created: ctx.created,
                model: ctx.model.clone(),
                choices: vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason,
                }],
                usage,
                pdserve: extension,
            })
        }
        Endpoint::Completions => {
            let (text, logprobs, finish_reason) = match part {
                ChunkPart::Role => (String::new(), None, None),
                ChunkPart::Text(text, lps) => (
                    text.to_string(),
                    ctx.want_logprobs.then(|| completion_logprobs(lps)),
                    None,
                ),
                ChunkPart::Finish(reason) => (String::new(), None, Some(reason)),
            };
            serde_json::to_string(&CompletionChunk {
                id: ctx.id.clone(),
                object: "text_completion".into(),
                created: ctx.created,
                model: ctx.model.clone(),
                choices: vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason,
                }],
                usage,
                pdserve: extension,
            })
        }
    }
}

/// The final usage chunk (`choices: []`), carrying the extension.
pub fn usage_chunk(
    ctx: &ResponseContext,
    usage: Usage,
    extension: ResponseExtension,
) -> Result<String, serde_json::Error> {
    match ctx.endpoint {
        Endpoint::Chat => serde_json::to_string(&ChatCompletionChunk {
            id: ctx.id.clone(),
            object: "chat.completion.chunk".into(),
            created: ctx.created,
            model: ctx.model.clone(),
            choices: Vec::new(),
            usage: Some(Some(usage)),
            pdserve: Some(extension),
        }),
        Endpoint::Completions => serde_json::to_string(&CompletionChunk {
            id: ctx.id.clone(),
            object: "text_completion".into(),
            created: ctx.created,
            model: ctx.model.clone(),
            choices: Vec::new(),
            usage: Some(Some(usage)),
            pdserve: Some(extension),
        }),
    }
}

/// `x-pdserve-timings` value: the known stage timings as `name=seconds` pairs.
pub fn timings_header(t: &StageTimings) -> String {
    let fields = [
        ("router_s", Some(t.router_s)),
        ("queue_s", t.queue_s),
        ("prefill_s", t.prefill_s),
        ("transfer_s", t.transfer_s),
        ("simulated_prefill_s", t.simulated_prefill_s),
        ("first_token_s", t.first_token_s),
        ("decode_s", t.decode_s),
        ("e2e_s", t.e2e_s),
    ];
    fields
        .iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name}={v:.6}")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(endpoint: Endpoint, include_usage: bool) -> ResponseContext {
        ResponseContext {
            endpoint,
            id: "x".into(),
            created: 1,
            model: "m".into(),
            want_logprobs: false,
            include_usage,
        }
    }

    #[test]
    fn chunks_carry_null_usage_only_when_usage_was_requested() {
        let with = chunk(
            &ctx(Endpoint::Chat, true),
            0,
            ChunkPart::Text("hi", &[]),
            None,
        )
        .unwrap();
        assert!(with.contains(r#""usage":null"#), "{with}");
        let without = chunk(
            &ctx(Endpoint::Chat, false),
            0,
            ChunkPart::Text("hi", &[]),
            None,
        )
        .unwrap();
        assert!(!without.contains("usage"), "{without}");
        assert!(without.contains(r#""logprobs":null"#), "{without}");
    }

    #[test]
    fn the_role_chunk_and_the_finish_chunk_have_openai_shapes() {
        let c = ctx(Endpoint::Chat, false);
        let role: serde_json::Value =
            serde_json::from_str(&chunk(&c, 2, ChunkPart::Role, None).unwrap()).unwrap();
        assert_eq!(
            role["choices"][0]["delta"],
            serde_json::json!({"role": "assistant", "content": ""})
        );
        assert_eq!(role["choices"][0]["index"], 2);
        let fin: serde_json::Value = serde_json::from_str(
            &chunk(&c, 0, ChunkPart::Finish(FinishReason::Length), None).unwrap(),
        )
        .unwrap();
        assert_eq!(fin["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn timings_header_lists_known_stages() {
        let t = StageTimings {
            router_s: 0.001,
            first_token_s: Some(0.5),
            ..StageTimings::default()
        };
        assert_eq!(
            timings_header(&t),
            "router_s=0.001000, first_token_s=0.500000"
        );
    }
}
