//! Shared harness: a router on a pre-bound loopback port in front of fake prefill and decode
//! instances, plus helpers to call it.

#![allow(dead_code, reason = "each test uses part of the harness")]

pub mod fake;
pub mod tokenizer;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use pdserve_protocol::params::SamplingParams;
use pdserve_router::config::RouterConfig;
use pdserve_router::policy::PolicyConfig;
use pdserve_router::{AppState, InstanceConfig, TextProcessor, app, serve_state};
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use fake::{DecodeScript, FakeDecode, FakePrefill, Gate, ModelFn, PrefillMode};

/// The served model name.
pub const MODEL: &str = "tiny-test";
/// What the fake model says (after an optional `[seed] ` prefix).
pub const REPLY: &str = "Hello world. This is pdserve.";

/// Cluster shape and config tweaks.
pub struct Options {
    pub prefill: usize,
    pub decode: usize,
    pub prefill_policy: PolicyConfig,
    pub decode_policy: PolicyConfig,
    pub tweak: Box<dyn FnOnce(&mut RouterConfig)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefill: 1,
            decode: 1,
            prefill_policy: PolicyConfig::RoundRobin,
            decode_policy: PolicyConfig::RoundRobin,
            tweak: Box::new(|_| {}),
        }
    }
}

pub struct Cluster {
    pub prefill: Vec<Arc<FakePrefill>>,
    pub decode: Vec<Arc<FakeDecode>>,
    pub state: Arc<AppState>,
    pub text: Arc<TextProcessor>,
    pub url: String,
    pub http: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// The fake model's output for a request: `[seed] ` + [`REPLY`], tokenized.
pub fn model_fn(text: Arc<TextProcessor>) -> ModelFn {
    Arc::new(move |s: &SamplingParams| {
        let prefix = s.seed.map(|seed| format!("[{seed}] ")).unwrap_or_default();
        text.encode(&format!("{prefix}{REPLY}"), false).unwrap()
    })
}

impl Cluster {
    pub async fn start(options: Options) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        tokenizer::write(dir.path());
        let text = Arc::new(TextProcessor::load(dir.path(), None).unwrap());
        Cluster::start_with_model(options, dir, text.clone(), model_fn(text)).await
    }

    pub async fn start_with_model(
        options: Options,
        dir: tempfile::TempDir,
        text: Arc<TextProcessor>,
        model: ModelFn,
    ) -> Cluster {
        let mut prefill = Vec::new();
        for i in 0..options.prefill {
            prefill.push(FakePrefill::start(&format!("p{i}"), model.clone()).await);
        }
        let mut decode = Vec::new();
        for i in 0..options.decode {
            decode.push(FakeDecode::start(&format!("d{i}"), model.clone()).await);
        }
        let mut config = RouterConfig {
            model: MODEL.into(),
            tokenizer: dir.path().to_path_buf(),
            prefill: prefill
                .iter()
                .map(|p| InstanceConfig {
                    id: p.id.clone(),
                    url: p.url.clone(),
                    kv_addr: None,
                })
                .collect(),
            decode: decode
                .iter()
                .map(|d| InstanceConfig {
                    id: d.id.clone(),
                    url: d.url.clone(),
                    kv_addr: None,
                })
                .collect(),
            prefill_policy: options.prefill_policy,
            decode_policy: options.decode_policy,
            ..RouterConfig::default()
        };
        config.health.interval_ms = 3_600_000;
        config.timeouts.total_ms = 20_000;
        (options.tweak)(&mut config);
        let state = AppState::new(config).unwrap();
        // Learn the instances' stats (decode KV addresses) before any request, also for oneshot.
        pdserve_router::health::probe_all(&state).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        tokio::spawn(async move {
            let _ = serve_state(serving, listener, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Cluster {
            prefill,
            decode,
            state,
            text,
            url,
            http: reqwest::Client::new(),
            _shutdown: shutdown,
            _dir: dir,
        }
    }

    /// The chat prompt's token count as the router computes it.
    pub fn chat_prompt_tokens(&self, user: &str) -> u64 {
        let rendered = format!(
            "{}{}{user}{}",
            tokenizer::BOS,
            tokenizer::USER,
            tokenizer::ASSISTANT
        );
        self.text.encode(&rendered, false).unwrap().len() as u64
    }

    /// Tokens of the fake model's reply (no seed).
    pub fn reply_tokens(&self) -> Vec<u32> {
        self.text.encode(REPLY, false).unwrap()
    }

    /// One request through `tower::oneshot` (no network).
    pub async fn oneshot(
        &self,
        request: Request<Body>,
    ) -> (u16, axum::http::HeaderMap, serde_json::Value) {
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    /// POST JSON over the network; returns status, headers and JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let json = r.json().await.unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    /// POST a streaming request and collect the SSE `data:` payloads until the stream ends.
    pub async fn stream(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, Vec<String>) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        (status, headers, sse_data(&text))
    }

    /// Renders the router's /metrics.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A chat request body.
pub fn chat_body(user: &str) -> serde_json::Value {
    serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": user}]})
}

/// Merges `extra` into `body`.
pub fn with(mut body: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A JSON POST request for `oneshot`.
pub fn json_request(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}
