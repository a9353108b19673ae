//! Fake prefill and decode instances implementing the internal API on pre-bound loopback ports.
//!
//! The fake "model" is a function from sampling parameters to the full output token sequence; the
//! prefill fake samples its first token and pushes a real KV frame (`pdserve_protocol::kv_frame`)
//! over TCP to the decode fake's KV port; the decode fake waits for that frame, then streams the
//! rest as NDJSON events. Behaviour changes (failures, holds) are scripted, and holds are gates,
//! never sleeps.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use parking_lot::Mutex;
use pdserve_protocol::http::ApiJson;
use pdserve_protocol::internal::*;
use pdserve_protocol::kv_frame::{
    FrameProgress, KvDtype, KvFrameHeader, KvShape, decode_frame, encode_frame, frame_progress,
};
use pdserve_protocol::openai::{FinishReason, SimMode};
use pdserve_protocol::params::SamplingParams;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Full output token sequence (first token included) for a request's sampling parameters.
pub type ModelFn = Arc<dyn Fn(&SamplingParams) -> Vec<u32> + Send + Sync>;

const MAX_FRAME_PAYLOAD: u64 = 1 << 24;

/// A gate: `wait` blocks until `open`.
#[derive(Debug)]
pub struct Gate(watch::Sender<bool>);

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate(watch::channel(false).0))
    }
    pub fn open(&self) {
        self.0.send_replace(true);
    }
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// Records items and lets tests wait for a condition on them.
pub struct Recorder<T> {
    items: Mutex<Vec<T>>,
    notify: Notify,
}

impl<T: Clone> Recorder<T> {
    fn new() -> Self {
        Recorder {
            items: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }
    fn push(&self, item: T) {
        self.items.lock().push(item);
        self.notify.notify_waiters();
    }
    pub fn all(&self) -> Vec<T> {
        self.items.lock().clone()
    }
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }
    /// Waits until `pred` holds (10 s safety limit, then panics).
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[T]) -> bool) {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                if pred(&self.items.lock()) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}");
        }
    }
}

fn logprob_of(sampling: &SamplingParams, id: u32) -> Option<TokenLogprob> {
    sampling.logprobs.map(|k| TokenLogprob {
        logprob: -0.5,
        top_logprobs: (0..u32::from(k))
            .map(|j| TopToken {
                id: id.wrapping_add(j),
                logprob: -0.5 - j as f32,
            })
            .collect(),
    })
}

fn stats(id: &str, role: Role, kv_addr: Option<String>) -> InstanceStats {
    InstanceStats {
        instance_id: id.to_string(),
        role,
        running: 0,
        waiting: 0,
        kv_usage: 0.0,
        kv_blocks_free: 100,
        kv_blocks_total: 100,
        queued_prompt_tokens: 0,
        kv_addr,
        max_model_len: Some(4096),
        kv_layers: Some(2),
        sim: Some(SimInfo {
            hardware: "h800".into(),
            time_scale: 1.0,
            modeled_model: "deepseek-v3".into(),
            mode: SimMode::Analysis,
        }),
    }
}

async fn serve(listener: TcpListener, app: Router) {
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// How a prefill fake answers.
#[derive(Clone)]
pub enum PrefillMode {
    /// Sample, push KV, answer.
    Normal,
    /// Answer this status without doing anything.
    Fail(u16),
    /// Never answer (until the connection closes).
    Hang,
    /// Answer success but never push the KV.
    SkipKv,
    /// Push the KV, then answer only once the gate opens.
    HoldAnswer(Arc<Gate>),
}

pub struct FakePrefill {
    pub id: String,
    pub url: String,
    pub mode: Mutex<PrefillMode>,
    pub requests: Recorder<PrefillRequest>,
    pub aborts: Recorder<String>,
    pub stats: Mutex<InstanceStats>,
    pub healthy: AtomicBool,
    model: ModelFn,
}

impl FakePrefill {
    pub async fn start(id: &str, model: ModelFn) -> Arc<FakePrefill> {
        let (listener, url) = bind().await;
        let fake = Arc::new(FakePrefill {
            id: id.into(),
            url,
            mode: Mutex::new(PrefillMode::Normal),
            requests: Recorder::new(),
            aborts: Recorder::new(),
            stats: Mutex::new(stats(id, Role::Prefill, None)),
            healthy: AtomicBool::new(true),
            model,
        });
        let app = Router::new()
            .route(PREFILL_PATH, post(prefill))
            .route(ABORT_PATH, post(prefill_abort))
            .route(
                STATS_PATH,
                get(|State(f): State<Arc<FakePrefill>>| async move {
                    axum::Json(f.stats.lock().clone())
                }),
            )
            .route(
                HEALTH_PATH,
                get(|State(f): State<Arc<FakePrefill>>| async move { health(&f.healthy) }),
            )
            .with_state(fake.clone());
        serve(listener, app).await;
        fake
    }

    pub fn set_mode(&self, mode: PrefillMode) {
        *self.mode.lock() = mode;
    }
}

fn health(flag: &AtomicBool) -> Response {
    if flag.load(Ordering::SeqCst) {
        axum::Json(HealthResponse::ok()).into_response()
    } else {
        ApiError::new(ErrorKind::Unavailable, "down").into_response()
    }
}

async fn push_kv(
    req: &PrefillRequest,
    first: u32,
    sampling: &SamplingParams,
) -> std::io::Result<()> {
    let header = KvFrameHeader {
        request_id: req.request_id.clone(),
        first_token: SampledToken {
            id: first,
            logprob: -0.5,
            top_logprobs: logprob_of(sampling, first)
                .map(|l| l.top_logprobs)
                .unwrap_or_default(),
        },
        seed: sampling.seed,
        sampled_tokens: 1,
        draft_token: None,
        shape: KvShape {
            layers: 2,
            tokens: req.prompt_token_ids.len() as u32,
            kv_lora_rank: 4,
            rope_dim: 2,
            hidden_dim: 0,
            dtype: KvDtype::Bf16,
        },
    };
    let payload = vec![0u8; header.shape.payload_bytes().unwrap() as usize];
    let frame = encode_frame(&header, &payload).unwrap();
    let mut stream = TcpStream::connect(&req.decode.kv_addr).await?;
    stream.write_all(&frame).await?;
    stream.shutdown().await
}

async fn prefill(
    State(fake): State<Arc<FakePrefill>>,
    ApiJson(req): ApiJson<PrefillRequest>,
) -> Result<axum::Json<PrefillResponse>, ApiError> {
    fake.requests.push(req.clone());
    let mode = fake.mode.lock().clone();
    let first = (fake.model)(&req.sampling)[0];
    match &mode {
        PrefillMode::Fail(status) => {
            return Err(ApiError::new(
                ErrorKind::from_status(*status),
                "scripted failure",
            ));
        }
        PrefillMode::Hang => std::future::pending::<()>().await,
        PrefillMode::SkipKv => {}
        PrefillMode::Normal | PrefillMode::HoldAnswer(_) => {
            push_kv(&req, first, &req.sampling)
                .await
                .map_err(|e| ApiError::internal(format!("kv push: {e}")))?;
        }
    }
    if let PrefillMode::HoldAnswer(gate) = &mode {
        gate.wait().await;
    }
    Ok(axum::Json(PrefillResponse {
        request_id: req.request_id.clone(),
        first_token: SampledToken {
            id: first,
            logprob: -0.5,
            top_logprobs: logprob_of(&req.sampling, first)
                .map(|l| l.top_logprobs)
                .unwrap_or_default(),
        },
        prompt_tokens: req.prompt_token_ids.len() as u32,
        cached_tokens: 3,
        timings: PrefillTimings {
            queue_s: 0.001,
            prefill_s: 0.002,
            transfer_s: 0.003,
            simulated_prefill_s: 0.004,
        },
    }))
}

async fn prefill_abort(
    State(fake): State<Arc<FakePrefill>>,
    ApiJson(req): ApiJson<AbortRequest>,
) -> axum::Json<AbortResponse> {
    fake.aborts.push(req.request_id.clone());
    axum::Json(AbortResponse {
        request_id: req.request_id,
        found: true,
    })
}

/// How a decode fake streams.
#[derive(Clone, Default)]
pub struct DecodeScript {
    /// Ids per `tokens` event (0 = 1).
    pub per_event: usize,
    /// Emit an `error` event after this many tokens.
    pub fail_after: Option<usize>,
    /// The kind of that error event (`internal` when unset).
    pub fail_kind: Option<DecodeErrorKind>,
    /// Wait for the gate before emitting the token at this index.
    pub hold_at: Option<(usize, Arc<Gate>)>,
}

pub struct FakeDecode {
    pub id: String,
    /// When set, `/internal/decode` answers this status.
    pub fail_open: Mutex<Option<u16>>,
    /// The next this many registrations end with a `kv_invalid` error once their KV frame
    /// arrived (as when the prefill side died mid-push), before any token.
    pub kv_invalid_next: Mutex<usize>,
    pub url: String,
    pub kv_addr: String,
    pub script: Mutex<DecodeScript>,
    pub requests: Recorder<DecodeRequest>,
    pub aborts: Recorder<String>,
    pub frames: Recorder<KvFrameHeader>,
    pub stats: Mutex<InstanceStats>,
    pub healthy: AtomicBool,
    waiting_kv: Mutex<HashMap<String, oneshot::Sender<KvFrameHeader>>>,
    /// Ids registered so far: like the real instance, a known id is refused.
    seen: Mutex<HashSet<String>>,
    active: Mutex<HashMap<String, oneshot::Sender<()>>>,
    model: ModelFn,
}

impl FakeDecode {
    pub async fn start(id: &str, model: ModelFn) -> Arc<FakeDecode> {
        let (listener, url) = bind().await;
        let kv_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let kv_addr = kv_listener.local_addr().unwrap().to_string();
        let fake = Arc::new(FakeDecode {
            id: id.into(),
            fail_open: Mutex::new(None),
            kv_invalid_next: Mutex::new(0),
            url,
            stats: Mutex::new(stats(id, Role::Decode, Some(kv_addr.clone()))),
            kv_addr,
            script: Mutex::new(DecodeScript::default()),
            requests: Recorder::new(),
            aborts: Recorder::new(),
            frames: Recorder::new(),
            healthy: AtomicBool::new(true),
            waiting_kv: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashSet::new()),
            active: Mutex::new(HashMap::new()),
            model,
        });
        let receiver = fake.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = kv_listener.accept().await {
                tokio::spawn(receiver.clone().receive_frames(conn));
            }
        });
        let app = Router::new()
            .route(DECODE_PATH, post(decode))
            .route(ABORT_PATH, post(decode_abort))
            .route(
                STATS_PATH,
                get(|State(f): State<Arc<FakeDecode>>| async move {
                    axum::Json(f.stats.lock().clone())
                }),
            )
            .route(
                HEALTH_PATH,
                get(|State(f): State<Arc<FakeDecode>>| async move { health(&f.healthy) }),
            )
            .with_state(fake.clone());
        serve(listener, app).await;
        fake
    }

    pub fn set_script(&self, script: DecodeScript) {
        *self.script.lock() = script;
    }

    async fn receive_frames(self: Arc<Self>, mut conn: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let need = match frame_progress(&buf, MAX_FRAME_PAYLOAD) {
                Ok(FrameProgress::NeedAtLeast(n)) => n,
                Ok(FrameProgress::Complete(n)) if buf.len() >= n => {
                    let frame: Vec<u8> = buf.drain(..n).collect();
                    let (header, _) = decode_frame(&frame, MAX_FRAME_PAYLOAD).unwrap();
                    self.frames.push(header.clone());
                    if let Some(tx) = self.waiting_kv.lock().remove(&header.request_id) {
                        let _ = tx.send(header);
                    }
                    continue;
                }
                Ok(FrameProgress::Complete(n)) => n,
                Err(e) => panic!("bad kv frame: {e}"),
            };
            let mut chunk = vec![0u8; need - buf.len()];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }
}

fn line(event: &DecodeEvent) -> Bytes {
    let mut s = serde_json::to_string(event).unwrap();
    s.push('\n');
    Bytes::from(s)
}

async fn decode(
    State(fake): State<Arc<FakeDecode>>,
    ApiJson(req): ApiJson<DecodeRequest>,
) -> Response {
    fake.requests.push(req.clone());
    if let Some(status) = *fake.fail_open.lock() {
        return ApiError::new(ErrorKind::from_status(status), "scripted failure").into_response();
    }
    if !fake.seen.lock().insert(req.request_id.clone()) {
        return ApiError::invalid_param("request_id", "request_id is already in use")
            .with_code("duplicate_request_id")
            .into_response();
    }
    let (kv_tx, kv_rx) = oneshot::channel();
    let (cancel_tx, cancel_rx) = oneshot::channel();
    fake.waiting_kv.lock().insert(req.request_id.clone(), kv_tx);
    fake.active.lock().insert(req.request_id.clone(), cancel_tx);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let script = fake.script.lock().clone();
    let model = fake.model.clone();
    let kv_invalid = {
        let mut next = fake.kv_invalid_next.lock();
        let fail = *next > 0;
        *next = next.saturating_sub(1);
        fail
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = produce(req, script, model, kv_rx, tx, kv_invalid) => {}
            _ = cancel_rx => {}
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [("content-type", NDJSON_CONTENT_TYPE)],
        Body::from_stream(body),
    )
        .into_response()
}

async fn produce(
    req: DecodeRequest,
    script: DecodeScript,
    model: ModelFn,
    kv: oneshot::Receiver<KvFrameHeader>,
    tx: mpsc::Sender<Bytes>,
    kv_invalid: bool,
) {
    let header = match tokio::time::timeout(Duration::from_millis(req.kv_timeout_ms), kv).await {
        Ok(Ok(h)) => h,
        _ => {
            let ev = DecodeEvent::Error {
                kind: DecodeErrorKind::KvTimeout,
                message: "no kv".into(),
            };
            let _ = tx.send(line(&ev)).await;
            return;
        }
    };
    if kv_invalid {
        let ev = DecodeEvent::Error {
            kind: DecodeErrorKind::KvInvalid,
            message: "kv frame closed after 12 bytes".into(),
        };
        let _ = tx.send(line(&ev)).await;
        return;
    }
    let mut tokens = model(&req.sampling);
    tokens[0] = header.first_token.id;
    let max = req.stop.max_tokens as usize;
    let n = tokens.len().min(max);
    let finish = if n == max {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    let per_event = script.per_event.max(1);
    let mut i = 0;
    while i < n {
        if let Some((at, gate)) = &script.hold_at
            && *at >= i
            && *at < i + per_event
        {
            gate.wait().await;
        }
        if script.fail_after.is_some_and(|k| i >= k) {
            let ev = DecodeEvent::Error {
                kind: script.fail_kind.unwrap_or(DecodeErrorKind::Internal),
                message: "scripted failure".into(),
            };
            let _ = tx.send(line(&ev)).await;
            return;
        }
        let end = (i + per_event).min(n);
        let ids = tokens[i..end].to_vec();
        let logprobs = req.sampling.logprobs.map(|_| {
            ids.iter()
                .filter_map(|&id| logprob_of(&req.sampling, id))
                .collect()
        });
        let ev = DecodeEvent::Tokens {
            ids,
            logprobs,
            finish_reason: (end == n).then_some(finish),
        };
        if tx.send(line(&ev)).await.is_err() {
            return;
        }
        i = end;
    }
    let ev = DecodeEvent::Done {
        usage: DecodeUsage {
            prompt_tokens: req.prompt_token_ids.len() as u32,
            completion_tokens: n as u32,
        },
        timings: DecodeTimings::default(),
    };
    let _ = tx.send(line(&ev)).await;
}

async fn decode_abort(
    State(fake): State<Arc<FakeDecode>>,
    ApiJson(req): ApiJson<AbortRequest>,
) -> axum::Json<AbortResponse> {
    fake.aborts.push(req.request_id.clone());
    let found = fake
        .active
        .lock()
        .remove(&req.request_id)
        .map(|tx| tx.send(()))
        .is_some();
    fake.waiting_kv.lock().remove(&req.request_id);
    axum::Json(AbortResponse {
        request_id: req.request_id,
        found,
    })
}
