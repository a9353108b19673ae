//! OpenAI streaming chunks: parsing one SSE payload ([`parse_event`]) and accumulating a
//! response's chunks with their arrival times ([`StreamAccumulator`]).
//!
//! Both are pure (times are arguments), so the measurement rules live here and are tested without
//! a server:
//! - a chunk counts as a token chunk only if it carries non-empty generated text (`delta.content`,
//!   `delta.reasoning_content`/`reasoning` for chat; `text` for completions). Role-only and
//!   usage-only chunks are not tokens, so TTFT is taken at the first *non-empty* chunk;
//! - token counts come from the final `usage` object when the server sends one;
//! - per-chunk token counts, used to normalize inter-token latency, come from (in order of
//!   preference) cumulative per-chunk `usage`, the chunk's `logprobs` list, the `--tokenizer`, or an
//!   even split of the output tokens over the chunks.

use crate::record::{Chunk, ChunkTokenSource, Failure, FailureKind};
use serde_json::Value;

/// Token counts of an OpenAI `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
}

/// What one SSE payload said.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// `data: [DONE]`.
    Done,
    /// A `chat.completion.chunk` or `text_completion` chunk.
    Chunk {
        /// Generated text in `choices[0]` (empty for role-only or usage-only chunks).
        text: String,
        /// `usage`, when the chunk carries one.
        usage: Option<Usage>,
        /// Number of entries in the chunk's logprobs token list, when present.
        logprob_tokens: Option<usize>,
    },
    /// An `{"error": …}` object in the stream.
    Error(String),
}

fn as_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn parse_usage(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| !u.is_null())?;
    Some(Usage {
        prompt_tokens: as_u64(u, "prompt_tokens").unwrap_or(0),
        completion_tokens: as_u64(u, "completion_tokens")?,
    })
}

fn error_message(err: &Value) -> String {
    match err {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| other.to_string(), str::to_owned),
    }
}

/// Parses one SSE `data` payload of a chat or completions stream.
pub fn parse_event(data: &str) -> Result<StreamEvent, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(StreamEvent::Done);
    }
    let v: Value =
        serde_json::from_str(data).map_err(|e| format!("chunk is not JSON ({e}): {data}"))?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Ok(StreamEvent::Error(error_message(err)));
    }
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let mut text = String::new();
    let mut logprob_tokens = None;
    if let Some(choice) = choice {
        if let Some(delta) = choice.get("delta") {
            for key in ["reasoning_content", "reasoning", "content"] {
                if let Some(s) = delta.get(key).and_then(Value::as_str) {
                    text.push_str(s);
                }
            }
        }
        if let Some(s) = choice.get("text").and_then(Value::as_str) {
            text.push_str(s);
        }
        if let Some(lp) = choice.get("logprobs").filter(|l| !l.is_null()) {
            let list = lp.get("content").or_else(|| lp.get("tokens"));
            logprob_tokens = list.and_then(Value::as_array).map(Vec::len);
        }
    }
    Ok(StreamEvent::Chunk {
        text,
        usage: parse_usage(&v),
        logprob_tokens,
    })
}

/// Counts tokens of a piece of text (implemented by the optional `--tokenizer`).
pub trait TokenCounter: Send + Sync {
    /// Number of tokens `text` encodes to, without special tokens.
    fn count_tokens(&self, text: &str) -> usize;
}

#[derive(Debug, Clone)]
struct RawChunk {
    at_s: f64,
    text: String,
    usage_tokens: Option<u64>,
    logprob_tokens: Option<usize>,
}

/// The result of a finished stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutcome {
    /// Content chunks with their token attribution.
    pub chunks: Vec<Chunk>,
    /// How the per-chunk tokens were obtained.
    pub chunk_token_source: ChunkTokenSource,
    /// The last `usage` seen, if any.
    pub usage: Option<Usage>,
    /// Output tokens: `usage.completion_tokens`, else the sum of per-chunk counts.
    pub output_tokens: u64,
    /// `None` when the stream completed with text.
    pub failure: Option<Failure>,
}

/// Collects the events of one response in arrival order.
#[derive(Debug, Default)]
pub struct StreamAccumulator {
    chunks: Vec<RawChunk>,
    usage: Option<Usage>,
    last_completion_tokens: u64,
    done: bool,
    failure: Option<Failure>,
}

impl StreamAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `[DONE]` or an error ended the stream (later events are ignored).
    pub fn is_finished(&self) -> bool {
        self.done || self.failure.is_some()
    }

    /// Feeds one SSE payload that arrived at `at_s`.
    pub fn on_payload(&mut self, at_s: f64, payload: &str) {
        if self.is_finished() {
            return;
        }
        match parse_event(payload) {
            Ok(StreamEvent::Done) => self.done = true,
            Ok(StreamEvent::Error(message)) => {
                self.failure = Some(Failure {
                    kind: FailureKind::StreamError,
                    status: None,
                    message,
                });
            }
            Ok(StreamEvent::Chunk {
                text,
                usage,
                logprob_tokens,
            }) => {
                let usage_tokens = usage.map(|u| {
                    let delta = u
                        .completion_tokens
                        .saturating_sub(self.last_completion_tokens);
                    self.last_completion_tokens = u.completion_tokens;
                    delta
                });
                if usage.is_some() {
                    self.usage = usage;
                }
                if !text.is_empty() {
                    self.chunks.push(RawChunk {
                        at_s,
                        text,
                        usage_tokens,
                        logprob_tokens,
                    });
                }
            }
            Err(message) => {
                self.failure = Some(Failure {
                    kind: FailureKind::Protocol,
                    status: None,
                    message,
                });
            }
        }
    }

    /// Records a failure that ended the stream from outside (transport error, timeout).
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }

    /// Ends the stream and attributes tokens to chunks.
    pub fn finish(self, tokenizer: Option<&dyn TokenCounter>) -> StreamOutcome {
        let mut failure = self.failure;
        if failure.is_none() && !self.done {
            failure = Some(Failure {
                kind: FailureKind::Incomplete,
                status: None,
                message: "stream ended without data: [DONE]".into(),
            });
        }
        if failure.is_none() && self.chunks.is_empty() {
            failure = Some(Failure {
                kind: FailureKind::Empty,
                status: None,
                message: "stream carried no generated text".into(),
            });
        }
        let (counts, source) = attribute_tokens(&self.chunks, self.usage, tokenizer);
        let counted: f64 = counts.iter().sum();
        let output_tokens = self
            .usage
            .map_or(counted.round() as u64, |u| u.completion_tokens);
        let chunks = self
            .chunks
            .iter()
            .zip(counts)
            .map(|(c, tokens)| Chunk {
                at_s: c.at_s,
                tokens,
            })
            .collect();
        StreamOutcome {
            chunks,
            chunk_token_source: source,
            usage: self.usage,
            output_tokens,
            failure,
        }
    }
}

fn attribute_tokens(
    chunks: &[RawChunk],
    usage: Option<Usage>,
    tokenizer: Option<&dyn TokenCounter>,
) -> (Vec<f64>, ChunkTokenSource) {
    let positive = |n: u64| n.max(1) as f64;
    if !chunks.is_empty() && chunks.iter().all(|c| c.usage_tokens.is_some()) {
        let counts = chunks
            .iter()
            .map(|c| positive(c.usage_tokens.unwrap_or(1)))
            .collect();
        return (counts, ChunkTokenSource::Usage);
    }
    if !chunks.is_empty() && chunks.iter().all(|c| c.logprob_tokens.is_some()) {
        let counts = chunks
            .iter()
            .map(|c| positive(c.logprob_tokens.unwrap_or(1) as u64))
            .collect();
        return (counts, ChunkTokenSource::Logprobs);
    }
    if let Some(tok) = tokenizer {
        let counts = chunks
            .iter()
            .map(|c| positive(tok.count_tokens(&c.text) as u64))
            .collect();
        return (counts, ChunkTokenSource::Tokenizer);
    }
    let per_chunk = match usage {
        Some(u) if !chunks.is_empty() => {
            (u.completion_tokens as f64 / chunks.len() as f64).max(1.0)
        }
        _ => 1.0,
    };
    (vec![per_chunk; chunks.len()], ChunkTokenSource::Uniform)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(content: &str) -> String {
        serde_json::json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":content}}]})
            .to_string()
    }

    #[test]
    fn role_only_chunk_is_not_a_token() {
        let mut acc = StreamAccumulator::new();
        acc.on_payload(
            0.01,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
        );
        acc.on_payload(0.05, &chat("Hi"));
        acc.on_payload(0.07, &chat(" there"));
        acc.on_payload(
            0.08,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
        );
        acc.on_payload(0.09, "[DONE]");
        let out = acc.finish(None);
        assert_eq!(out.failure, None);
        assert_eq!(out.chunks.len(), 2);
        assert_eq!(out.chunks[0].at_s, 0.05);
        assert_eq!(out.output_tokens, 2);
        assert_eq!(out.usage.map(|u| u.prompt_tokens), Some(7));
    }

    #[test]
    fn completions_text_chunks_are_parsed() {
        let ev =
            parse_event(r#"{"object":"text_completion","choices":[{"index":0,"text":"abc"}]}"#)
                .unwrap();
        assert!(matches!(ev, StreamEvent::Chunk { ref text, .. } if text == "abc"));
    }

    #[test]
    fn continuous_usage_gives_per_chunk_tokens() {
        let mut acc = StreamAccumulator::new();
        let c = |text: &str, n: u64| {
            serde_json::json!({"choices":[{"delta":{"content":text}}],"usage":{"prompt_tokens":3,"completion_tokens":n}})
                .to_string()
        };
        acc.on_payload(0.1, &c("a", 1));
        acc.on_payload(0.3, &c("b c", 3));
        acc.on_payload(0.4, "[DONE]");
        let out = acc.finish(None);
        assert_eq!(out.chunk_token_source, ChunkTokenSource::Usage);
        assert_eq!(
            out.chunks.iter().map(|c| c.tokens).collect::<Vec<_>>(),
            vec![1.0, 2.0]
        );
        assert_eq!(out.output_tokens, 3);
    }

    #[test]
    fn uniform_split_uses_usage_total() {
        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, &chat("ab"));
        acc.on_payload(0.2, &chat("cd"));
        acc.on_payload(
            0.2,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":4}}"#,
        );
        acc.on_payload(0.3, "[DONE]");
        let out = acc.finish(None);
        assert_eq!(out.chunk_token_source, ChunkTokenSource::Uniform);
        assert_eq!(out.chunks[1].tokens, 2.0);
    }

    #[test]
    fn missing_done_is_incomplete_and_error_object_is_stream_error() {
        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, &chat("a"));
        assert_eq!(
            acc.finish(None).failure.map(|f| f.kind),
            Some(FailureKind::Incomplete)
        );

        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, &chat("a"));
        acc.on_payload(
            0.2,
            r#"{"error":{"message":"boom","type":"server_error","code":500}}"#,
        );
        let f = acc.finish(None).failure.unwrap();
        assert_eq!(f.kind, FailureKind::StreamError);
        assert_eq!(f.message, "boom");
    }

    #[test]
    fn malformed_chunk_is_protocol_failure_and_empty_stream_is_empty() {
        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, "{not json");
        assert_eq!(
            acc.finish(None).failure.map(|f| f.kind),
            Some(FailureKind::Protocol)
        );

        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, "[DONE]");
        assert_eq!(
            acc.finish(None).failure.map(|f| f.kind),
            Some(FailureKind::Empty)
        );
    }

    struct Chars;
    impl TokenCounter for Chars {
        fn count_tokens(&self, text: &str) -> usize {
            text.chars().count()
        }
    }

    #[test]
    fn tokenizer_counts_chunk_text_when_server_gives_no_per_chunk_counts() {
        let mut acc = StreamAccumulator::new();
        acc.on_payload(0.1, &chat("abc"));
        acc.on_payload(0.2, "[DONE]");
        let out = acc.finish(Some(&Chars));
        assert_eq!(out.chunk_token_source, ChunkTokenSource::Tokenizer);
        assert_eq!(out.output_tokens, 3);
    }
}
