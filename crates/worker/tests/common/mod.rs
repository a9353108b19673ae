//! Harness of the services' integration tests: a gated, probing stand-in model, servers on
//! pre-bound `127.0.0.1:0` listeners, and clients for the internal API.
//!
//! Gates instead of sleeps: [`Gate`] holds the executor inside `execute` until the test lets
//! steps through, and reports (through a watch channel) how many steps entered, so a test can
//! wait for "the engine is computing step k" without timing assumptions.

#![allow(dead_code, reason = "each test uses a subset of the harness")]
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed setup must panic the test"
)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use pdserve_engine::{
    BlockId, Executor, LatentShape, LinearStepClock, RequestId, ScriptedExecutor, StepOutputs,
    StepPlan,
};
use pdserve_protocol::internal::{
    DecodeEvent, DecodeRequest, DecodeTarget, InstanceStats, PrefillRequest,
};
use pdserve_protocol::params::{SamplingParams, StopParams};
use pdserve_worker::{
    DecodeConfig, DecodeListeners, EngineParts, KvAccess, KvError, KvRows, LinearFabricClock,
    PrefillConfig, ScriptedBackend, SeqParams, serve_decode, serve_prefill,
};
use tokio::sync::{mpsc, oneshot, watch};

/// The latent shape of every test instance.
pub const SHAPE: LatentShape = LatentShape {
    num_layers: 2,
    kv_lora_rank: 8,
    rope_dim: 4,
};
/// Scripted tokens are below this; the EOS id is above it, so generations run to `max_tokens`.
pub const VOCAB: u32 = 1000;
/// End-of-sequence id (never produced by the script).
pub const EOS: u32 = 5000;
/// KV blocks of each test instance.
pub const NUM_BLOCKS: usize = 64;

/// Holds the executor until released; counts steps that entered.
#[derive(Clone, Debug)]
pub struct Gate {
    state: Arc<(Mutex<GateState>, Condvar)>,
    entered_tx: Arc<watch::Sender<u64>>,
    entered_rx: watch::Receiver<u64>,
}

#[derive(Debug, Default)]
struct GateState {
    open: bool,
    permits: u64,
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        let (tx, rx) = watch::channel(0);
        Self {
            state: Arc::new((Mutex::new(GateState::default()), Condvar::new())),
            entered_tx: Arc::new(tx),
            entered_rx: rx,
        }
    }

    /// Lets every step through from now on.
    pub fn open(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().open = true;
        cv.notify_all();
    }

    /// Lets `n` more steps through.
    pub fn release(&self, n: u64) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().permits += n;
        cv.notify_all();
    }

    /// Waits until at least `n` steps entered the executor.
    pub async fn entered(&self, n: u64) {
        let mut rx = self.entered_rx.clone();
        rx.wait_for(|&k| k >= n).await.unwrap();
    }

    fn pass(&self) {
        self.entered_tx.send_modify(|k| *k += 1);
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        while !s.open && s.permits == 0 {
            s = cv.wait(s).unwrap();
        }
        if !s.open {
            s.permits -= 1;
        }
    }
}

/// KV written into a decode instance for an arrived request, read back after its first step.
#[derive(Debug)]
pub struct KvProbe {
    pub id: RequestId,
    pub rows: KvRows,
}

/// The scripted backend with an optional gate and a probe of arrived KV.
#[derive(Debug)]
pub struct TestBackend {
    inner: ScriptedBackend,
    gate: Option<Gate>,
    probe: Option<mpsc::UnboundedSender<KvProbe>>,
    fail_at_step: Option<u64>,
    steps: u64,
}

impl TestBackend {
    pub fn new() -> Self {
        Self {
            inner: ScriptedBackend::new(ScriptedExecutor::new(VOCAB), SHAPE, NUM_BLOCKS).unwrap(),
            gate: None,
            probe: None,
            fail_at_step: None,
            steps: 0,
        }
    }

    /// Fails the `n`-th step (1-based) with a store error.
    pub fn failing_at_step(mut self, n: u64) -> Self {
        self.fail_at_step = Some(n);
        self
    }

    pub fn gated(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    pub fn probed(mut self, tx: mpsc::UnboundedSender<KvProbe>) -> Self {
        self.probe = Some(tx);
        self
    }
}

impl Executor<SeqParams> for TestBackend {
    type Routing = ();
    type Error = pdserve_engine::StoreError;

    fn execute(&mut self, plan: &StepPlan<SeqParams>) -> Result<StepOutputs<()>, Self::Error> {
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        self.steps += 1;
        if self.fail_at_step == Some(self.steps) {
            return Err(pdserve_engine::StoreError::Layer {
                layer: 99,
                num_layers: SHAPE.num_layers,
            });
        }
        let out = self.inner.execute(plan)?;
        if let Some(probe) = &self.probe {
            for load in &plan.kv_loads {
                let rows =
                    KvRows::gather(self.inner.store(), &load.block_table, load.num_tokens).unwrap();
                let _ = probe.send(KvProbe { id: load.id, rows });
            }
        }
        Ok(out)
    }
}

impl KvAccess for TestBackend {
    fn latent_shape(&self) -> LatentShape {
        self.inner.latent_shape()
    }
    fn stage_arrived_kv(&mut self, id: RequestId, kv: KvRows) -> Result<(), KvError> {
        self.inner.stage_arrived_kv(id, kv)
    }
    fn export_kv(&mut self, table: &[BlockId], tokens: usize) -> Result<KvRows, KvError> {
        self.inner.export_kv(table, tokens)
    }
}

/// A clock charging `step_ns` per step and `kv_ns` per KV transfer.
pub fn clock(step_ns: u64, kv_ns: u64) -> LinearFabricClock {
    LinearFabricClock {
        step: LinearStepClock {
            base_ns: step_ns,
            per_token_ns: 0,
        },
        kv_base_ns: kv_ns,
        kv_per_token_ns: 0,
    }
}

pub fn parts(
    backend: TestBackend,
    clock: LinearFabricClock,
) -> EngineParts<TestBackend, LinearFabricClock> {
    EngineParts {
        executor: backend,
        clock,
        eos_token_ids: vec![EOS],
        sim: None,
    }
}

/// Engine settings of every test instance, unpaced unless a test says otherwise.
pub fn engine_config() -> pdserve_worker::EngineConfig {
    pdserve_worker::EngineConfig {
        scheduler: pdserve_engine::SchedulerConfig {
            num_kv_blocks: NUM_BLOCKS,
            max_context_tokens: 1024,
            prefill_chunk_tokens: 48,
            max_batched_tokens: 256,
            ..pdserve_engine::SchedulerConfig::default()
        },
        time_scale: 0.0,
        ..pdserve_worker::EngineConfig::default()
    }
}

/// A server running until dropped.
#[derive(Debug)]
pub struct Server {
    pub base: String,
    /// Decode only: the KV receiver's address.
    pub kv_addr: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

pub async fn start_decode(
    config: DecodeConfig,
    parts: EngineParts<TestBackend, LinearFabricClock>,
) -> Server {
    let listeners = DecodeListeners {
        http: bind().await,
        kv: bind().await,
    };
    let base = format!("http://{}", listeners.http.local_addr().unwrap());
    let kv_addr = listeners.kv.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_decode(config, parts, listeners, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        base,
        kv_addr,
        stop: Some(stop),
    }
}

pub async fn start_prefill(
    config: PrefillConfig,
    parts: EngineParts<TestBackend, LinearFabricClock>,
) -> Server {
    let listener = bind().await;
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_prefill(config, parts, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        base,
        kv_addr: String::new(),
        stop: Some(stop),
    }
}

pub fn decode_config() -> DecodeConfig {
    DecodeConfig {
        instance_id: "decode-test".into(),
        engine: engine_config(),
        ..DecodeConfig::default()
    }
}

pub fn prefill_config() -> PrefillConfig {
    PrefillConfig {
        instance_id: "prefill-test".into(),
        engine: engine_config(),
        ..PrefillConfig::default()
    }
}

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        seed: Some(7),
        ..SamplingParams::default()
    }
}

fn stop(max_tokens: u32) -> StopParams {
    StopParams {
        max_tokens,
        stop_token_ids: vec![],
        ignore_eos: false,
        min_tokens: 0,
    }
}

pub fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 100 + i % 50).collect()
}

pub fn decode_request(
    id: &str,
    prompt: &[u32],
    max_tokens: u32,
    kv_timeout_ms: u64,
) -> DecodeRequest {
    DecodeRequest {
        request_id: id.into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: sampling(),
        stop: stop(max_tokens),
        kv_timeout_ms,
    }
}

pub fn prefill_request(id: &str, prompt: &[u32], max_tokens: u32, kv_addr: &str) -> PrefillRequest {
    PrefillRequest {
        request_id: id.into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: sampling(),
        stop: stop(max_tokens),
        decode: DecodeTarget {
            instance_id: "decode-test".into(),
            kv_addr: kv_addr.into(),
        },
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// The NDJSON events of one decode stream.
pub struct Events {
    body: BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: Vec<u8>,
}

impl Events {
    /// The next event; `None` at the end of the body.
    pub async fn next(&mut self) -> Option<DecodeEvent> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line[..i]).unwrap());
            }
            match self.body.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk.unwrap()),
                None => {
                    assert!(self.buf.is_empty(), "partial line at the end of the stream");
                    return None;
                }
            }
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<DecodeEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// Opens a decode stream; returns once the response head arrived (the request is registered).
pub async fn open_decode(base: &str, request: &DecodeRequest) -> Events {
    let response = client()
        .post(format!("{base}/internal/decode"))
        .json(request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "decode head");
    assert_eq!(
        response.headers()["content-type"],
        "application/x-ndjson",
        "decode content type"
    );
    Events {
        body: response.bytes_stream().boxed(),
        buf: Vec::new(),
    }
}

/// `POST path` with a JSON body; returns status and JSON answer.
pub async fn post_json<T: serde::Serialize>(
    base: &str,
    path: &str,
    body: &T,
) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

pub async fn stats(base: &str) -> InstanceStats {
    client()
        .get(format!("{base}/internal/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `check` on the instance's stats until it holds (state polling, not a timing
/// assumption; the bound only keeps a broken build from hanging).
pub async fn eventually_stats(
    base: &str,
    what: &str,
    check: impl Fn(&InstanceStats) -> bool,
) -> InstanceStats {
    for _ in 0..2000 {
        let s = stats(base).await;
        if check(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: never held; last stats {:?}", stats(base).await);
}

/// Polls `/metrics` until it contains `needle`.
pub async fn eventually_metric(base: &str, needle: &str) {
    for _ in 0..2000 {
        if metrics_text(base).await.contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "metric `{needle}` never appeared:\n{}",
        metrics_text(base).await
    );
}

pub fn all_blocks_free(s: &InstanceStats) -> bool {
    s.kv_blocks_free == s.kv_blocks_total
}

/// A stand-in KV receiver that reads whole frames, reports each frame's request id, and
/// acknowledges (`accepted`) only as `acks` permits are added: it holds prefill transfers open.
pub async fn holding_kv_receiver(
    acks: Arc<tokio::sync::Semaphore>,
) -> (String, mpsc::UnboundedReceiver<String>) {
    use pdserve_protocol::kv_frame::{FrameProgress, frame_progress};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = bind().await;
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let (tx, acks) = (tx.clone(), Arc::clone(&acks));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let want = match frame_progress(&buf, u64::MAX).unwrap() {
                        FrameProgress::NeedAtLeast(n) => n,
                        FrameProgress::Complete(n) if buf.len() == n => break,
                        FrameProgress::Complete(n) => n,
                    };
                    let old = buf.len();
                    buf.resize(want, 0);
                    conn.read_exact(&mut buf[old..]).await.unwrap();
                }
                tx.send(pdserve_worker::peek_request_id(&buf).unwrap())
                    .unwrap();
                acks.acquire().await.unwrap().forget();
                conn.write_all(&[pdserve_worker::KvAck::Accepted.code()])
                    .await
                    .unwrap();
            });
        }
    });
    (addr, rx)
}
