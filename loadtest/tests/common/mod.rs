//! A scripted fake OpenAI server for loadtest's integration tests.
//!
//! It streams chat and completions responses whose timing is the script: the first content chunk
//! `ttft_ms` after the request arrives, then one chunk `itl_ms` after the previous one went out
//! (so every gap the server produces is at least the script's, even on a loaded machine),
//! `tokens_per_chunk` tokens per chunk, a role-only chunk first for
//! chat (which must not count as the first token), a final usage chunk when
//! `stream_options.include_usage` is set, per-chunk usage when `continuous_usage_stats` is set,
//! per-token logprobs when `logprobs` is requested,
//! and `data: [DONE]`. Per-request behaviors inject failures; a gate can hold every response
//! until a number of requests has arrived. Served on a pre-bound `127.0.0.1:0` listener.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a setup failure must abort the test"
)]

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What the server does with the request that arrived `n`-th (0-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behavior {
    /// Stream normally.
    Stream,
    /// Stream normally but with this TTFT instead of the script's.
    SlowFirstToken { ttft_ms: u64 },
    /// Answer with this status and an OpenAI error envelope.
    Status(u16),
    /// Send this many content chunks, then an `{"error": …}` event.
    ErrorAfter(usize),
    /// Send this many content chunks, then end the body without `[DONE]`.
    DropAfter(usize),
}

/// The server's script.
#[derive(Clone)]
pub struct Script {
    /// Delay from request arrival to the first content chunk.
    pub ttft_ms: u64,
    /// Gap between content chunks.
    pub itl_ms: u64,
    /// Tokens (words) per content chunk.
    pub tokens_per_chunk: u64,
    /// Reported in `/v1/models` as `pdserve.time_scale`.
    pub time_scale: Option<f64>,
    /// Behavior by arrival order.
    pub behavior: Arc<dyn Fn(usize) -> Behavior + Send + Sync>,
    /// Hold every response until this many requests have arrived.
    pub hold_until_arrivals: Option<usize>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            ttft_ms: 50,
            itl_ms: 20,
            tokens_per_chunk: 1,
            time_scale: None,
            behavior: Arc::new(|_| Behavior::Stream),
            hold_until_arrivals: None,
        }
    }
}

/// What the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request bodies in arrival order.
    pub bodies: Vec<Value>,
}

struct AppState {
    script: Script,
    seen: Mutex<Seen>,
    arrivals: watch::Sender<usize>,
}

/// A running fake server.
pub struct FakeServer {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    state: Arc<AppState>,
}

impl FakeServer {
    /// Starts the server on a pre-bound ephemeral port.
    pub async fn start(script: Script) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrivals, _) = watch::channel(0);
        let state = Arc::new(AppState {
            script,
            seen: Mutex::new(Seen { bodies: Vec::new() }),
            arrivals,
        });
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(complete))
            .route("/v1/completions", post(complete))
            .with_state(Arc::clone(&state));
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base_url: format!("http://{addr}"),
            state,
        }
    }

    /// A snapshot of what the server has seen.
    pub fn seen(&self) -> Seen {
        self.state.seen.lock().unwrap().clone()
    }
}

/// A base URL nothing listens on (bound, then released).
pub async fn closed_port_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

async fn models(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let mut model = json!({"id": "fake-model", "object": "model", "owned_by": "test"});
    if let Some(scale) = st.script.time_scale {
        model["pdserve"] = json!({"hardware": "h800", "time_scale": scale});
    }
    axum::Json(json!({"object": "list", "data": [model]}))
}

/// One content chunk; `logprobs` is the number of tokens in it when logprobs were requested.
fn chunk(chat: bool, text: &str, usage: Option<Value>, logprobs: Option<u64>) -> String {
    let mut v = if chat {
        json!({"id":"c","object":"chat.completion.chunk","model":"fake-model",
               "choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]})
    } else {
        json!({"id":"c","object":"text_completion","model":"fake-model",
               "choices":[{"index":0,"text":text,"finish_reason":null}]})
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    if let Some(n) = logprobs {
        v["choices"][0]["logprobs"] = if chat {
            json!({"content": (0..n).map(|_| json!({"token": " tok", "logprob": -0.5})).collect::<Vec<_>>()})
        } else {
            json!({"tokens": vec![" tok"; n as usize], "token_logprobs": vec![-0.5; n as usize]})
        };
    }
    format!("data: {v}\n\n")
}

async fn complete(
    State(st): State<Arc<AppState>>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let n = {
        let mut seen = st.seen.lock().unwrap();
        seen.bodies.push(body.clone());
        seen.bodies.len() - 1
    };
    st.arrivals.send_modify(|c| *c += 1);
    if let Some(k) = st.script.hold_until_arrivals {
        let mut rx = st.arrivals.subscribe();
        let _ = rx.wait_for(|c| *c >= k).await;
    }
    let released = Instant::now();
    let behavior = (st.script.behavior)(n);
    if let Behavior::Status(code) = behavior {
        let status = StatusCode::from_u16(code).unwrap();
        let env = json!({"error": {"message": format!("scripted {code}"), "type": "server_error", "param": null, "code": code}});
        return (status, axum::Json(env)).into_response();
    }
    let chat = body.get("messages").is_some();
    let prompt_tokens = if chat {
        body["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .count()
    } else {
        body["prompt"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .count()
    } as u64;
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(16);
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&json!(true));
    let continuous = body.pointer("/stream_options/continuous_usage_stats") == Some(&json!(true));
    let logprobs = body
        .get("logprobs")
        .is_some_and(|v| !v.is_null() && *v != json!(false));
    let script = st.script.clone();
    let ttft_ms = match behavior {
        Behavior::SlowFirstToken { ttft_ms } => ttft_ms,
        _ => script.ttft_ms,
    };
    let (mut tx, rx) = mpsc::channel::<Result<String, Infallible>>(16);
    tokio::spawn(async move {
        if chat {
            let role = json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]});
            let _ = tx.send(Ok(format!("data: {role}\n\n"))).await;
        }
        let chunks = max_tokens.div_ceil(script.tokens_per_chunk);
        let mut next_at = released + Duration::from_millis(ttft_ms);
        let mut sent_tokens = 0;
        for k in 0..chunks {
            tokio::time::sleep_until(next_at).await;
            // Each gap is at least the script's, even when a chunk went out late.
            next_at = Instant::now() + Duration::from_millis(script.itl_ms);
            match behavior {
                Behavior::ErrorAfter(m) if k as usize == m => {
                    let e = json!({"error": {"message": "scripted stream error", "type": "server_error", "code": 500}});
                    let _ = tx.send(Ok(format!("data: {e}\n\n"))).await;
                    return;
                }
                Behavior::DropAfter(m) if k as usize == m => return,
                _ => {}
            }
            let take = script.tokens_per_chunk.min(max_tokens - sent_tokens);
            sent_tokens += take;
            let text: String = (0..take).map(|_| " tok").collect();
            let usage = continuous.then(|| json!({"prompt_tokens": prompt_tokens, "completion_tokens": sent_tokens, "total_tokens": prompt_tokens + sent_tokens}));
            if tx
                .send(Ok(chunk(chat, &text, usage, logprobs.then_some(take))))
                .await
                .is_err()
            {
                return;
            }
        }
        if include_usage {
            let u = json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sent_tokens, "total_tokens": prompt_tokens + sent_tokens}});
            let _ = tx.send(Ok(format!("data: {u}\n\n"))).await;
        }
        let _ = tx.send(Ok("data: [DONE]\n\n".to_owned())).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(
            rx.map(|r| r.map(axum::body::Bytes::from)),
        ))
        .unwrap()
}

/// A word-level `tokenizer.json` (whitespace pre-tokenizer) knowing loadtest's prompt words and
/// the fake server's output word `tok`.
pub fn word_level_tokenizer() -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in loadtest::prompt::WORDS.iter().chain(&["tok"]).enumerate() {
        vocab.insert((*w).to_owned(), (i + 1).into());
    }
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(json.to_string().as_bytes()).unwrap();
    f
}
