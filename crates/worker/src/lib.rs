//! pdserve's prefill and decode services.
//!
//! Principal types:
//! - [`spawn_engine`] → [`EngineHandle`]: the engine actor (one task owns the scheduler state,
//!   a dedicated thread runs the model), with [`Submission`] in and a [`RequestStream`] of
//!   [`EngineEvent`]s out; pacing of simulated time; bounded queues.
//! - [`serve_decode`] / [`DecodeService`] with [`DecodeConfig`]: `POST /internal/decode`
//!   (NDJSON event stream), `/internal/abort`, `/internal/stats`, `/health`, `/metrics`, and a TCP
//!   KV receiver that pairs KV frames with decode requests in either order.
//! - [`serve_prefill`] / [`PrefillService`] with [`PrefillConfig`]: `POST /internal/prefill` runs
//!   the prompt, pushes the KV frame to the decode target, answers a `PrefillResponse`.
//! - Seams: [`EngineParts`] = an executor (engine `Executor` over [`SeqParams`] + [`KvAccess`]:
//!   stage arrived KV, export computed KV) and a clock (engine `StepClock` +
//!   [`KvTransferClock`]); stand-ins [`ScriptedBackend`], [`LinearFabricClock`].
//! - [`metrics::ServiceMetrics`]: each service's registry, names from the catalog
//!   [`pdserve_protocol::metrics`] (docs/metrics.md); docs/services.md describes the services.
//!
//! ```
//! use pdserve_engine::{LatentShape, LinearStepClock, ScriptedExecutor};
//! use pdserve_worker::{
//!     DecodeConfig, DecodeListeners, EngineParts, LinearFabricClock, ScriptedBackend,
//!     serve_decode,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = DecodeConfig::default();
//! let shape = LatentShape { num_layers: 2, kv_lora_rank: 8, rope_dim: 4 };
//! let parts = EngineParts {
//!     executor: ScriptedBackend::new(
//!         ScriptedExecutor::new(1000),
//!         shape,
//!         config.engine.scheduler.num_kv_blocks,
//!     )?,
//!     clock: LinearFabricClock {
//!         step: LinearStepClock { base_ns: 50_000, per_token_ns: 100 },
//!         kv_base_ns: 10_000,
//!         kv_per_token_ns: 70,
//!     },
//!     eos_token_ids: vec![0],
//!     sim: None,
//! };
//! let listeners = DecodeListeners {
//!     http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
//!     kv: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
//! };
//! // Serves until the shutdown future resolves (here: at once).
//! serve_decode(config, parts, listeners, async {}).await?;
//! # Ok(())
//! # }
//! ```

mod backend;
mod config;
mod decode;
mod engine;
mod kv;
pub mod metrics;
mod prefill;
mod service;
mod transfer;

pub use backend::{
    EngineParts, FabricStepReport, KvAccess, KvTransferClock, LinearFabricClock, ScriptedBackend,
    SeqParams, SimLabel,
};
pub use config::{ConfigError, DecodeConfig, EngineConfig, PrefillConfig};
pub use decode::{DecodeListeners, DecodeService, DecodeState, decode_app, serve_decode};
pub use engine::{
    EngineEvent, EngineHandle, EngineInfo, EngineSnapshot, ExportError, ExportedKv, FailureKind,
    KvInput, PrefilledKv, RequestReport, RequestStream, SpawnError, Submission, SubmitError,
    request_key, spawn_engine,
};
pub use kv::{
    IncomingKv, KvAck, KvError, KvRows, OutgoingKv, decode_kv_frame, encode_kv_frame,
    peek_request_id,
};
pub use prefill::{PrefillService, PrefillState, prefill_app, serve_prefill};
pub use service::ServeError;
