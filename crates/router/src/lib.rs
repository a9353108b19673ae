//! pdserve's router: the OpenAI-compatible front door that validates and tokenizes requests,
//! chooses a prefill and a decode instance, orchestrates the two legs over the internal HTTP API,
//! and relays tokens back as JSON or SSE. It never links the model (no candle in its tree).
//!
//! Principal types:
//! - [`RouterConfig`]: the whole configuration (instances, policies, timeouts, limits, keys);
//! - [`AppState`] and [`app`]: the axum router over the shared state (tests drive it with
//!   `tower::ServiceExt::oneshot` or a real listener); [`serve`] runs it with graceful shutdown;
//! - [`policy::Policy`]: pure instance selection ([`policy::RoundRobin`], [`policy::LeastLoad`],
//!   [`policy::PowerOfTwo`], [`policy::CacheAware`]);
//! - [`orchestrate::Orchestrator`]: one task per generation, retries, stage timeouts and aborts;
//! - [`compat::PairMismatch`]: prefill/decode pairs ruled out by differing KV layer counts;
//! - [`assemble::ChoiceAssembler`]: incremental detokenization and stop strings;
//! - [`metrics::RouterMetrics`]: the `pdserve_router_*` metrics, named in the catalog
//!   [`pdserve_protocol::metrics`] (docs/metrics.md).
//!
//! ```no_run
//! use pdserve_router::{InstanceConfig, RouterConfig, serve};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RouterConfig {
//!     tokenizer: "config/models".into(),
//!     prefill: vec![InstanceConfig { id: "p0".into(), url: "http://127.0.0.1:9100".into(), kv_addr: None }],
//!     decode: vec![InstanceConfig { id: "d0".into(), url: "http://127.0.0.1:9200".into(), kv_addr: None }],
//!     ..RouterConfig::default()
//! };
//! let listener = tokio::net::TcpListener::bind(&config.listen).await?;
//! serve(config, listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

pub mod assemble;
pub mod client;
pub mod compat;
pub mod config;
pub mod generate;
pub mod generation;
pub mod health;
pub mod instances;
pub mod metrics;
pub mod orchestrate;
pub mod policy;
pub mod respond;
pub mod server;
pub mod state;
mod stream;
pub mod template;
pub mod text;

pub use config::{InstanceConfig, RouterConfig};
pub use server::{app, serve, serve_state};
pub use state::{AppState, RouterError};
pub use text::TextProcessor;
