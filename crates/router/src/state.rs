//! The router's shared state: a few sub-services behind one `Arc`, built once from the config.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::Gauge;
use pdserve_protocol::internal::Role;
use pdserve_protocol::openai::{ModelCard, ModelList, ModelSimulation};
use pdserve_protocol::params::Limits;
use pdserve_protocol::{ApiError, ErrorKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::InstanceClient;
use crate::compat::PairMismatch;
use crate::config::{ConfigError, RouterConfig};
use crate::instances::Pool;
use crate::metrics::{RouterMetrics, catalog};
use crate::orchestrate::Orchestrator;
use crate::text::{TextError, TextProcessor};

/// Why the router cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Tokenizer or chat template.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// HTTP client.
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    /// Serving.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared state of the router's handlers and background tasks.
#[derive(Debug)]
pub struct AppState {
    /// The configuration it was built from.
    pub config: RouterConfig,
    /// Validation limits.
    pub limits: Limits,
    /// Tokenizer and chat template.
    pub text: Arc<TextProcessor>,
    /// Prefill/decode orchestration (pools, client, timeouts).
    pub orchestrator: Arc<Orchestrator>,
    /// Metrics registry.
    pub metrics: Arc<RouterMetrics>,
    /// Prefill/decode pairs with differing KV layer counts, as of the last probe round (to log
    /// changes once).
    pub pair_mismatches: parking_lot::Mutex<Vec<PairMismatch>>,
    admission: Arc<Semaphore>,
    running: Gauge,
    seq: AtomicU64,
    started_unix_s: u64,
}

/// A request admitted under the concurrency limit; releases its slot when dropped.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    running: Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.running.decrement(1.0);
    }
}

impl AppState {
    /// Builds the state, loading the tokenizer named by the config.
    pub fn new(config: RouterConfig) -> Result<Arc<AppState>, RouterError> {
        config.validate()?;
        let text = TextProcessor::load(&config.tokenizer, config.chat_template.as_deref())?;
        AppState::with_text(config, text)
    }

    /// Builds the state around an already loaded tokenizer.
    pub fn with_text(
        config: RouterConfig,
        text: TextProcessor,
    ) -> Result<Arc<AppState>, RouterError> {
        config.validate()?;
        let metrics = Arc::new(RouterMetrics::new()?);
        let orchestrator = Arc::new(Orchestrator {
            prefill: Pool::new(
                Role::Prefill,
                &config.prefill,
                config.prefill_policy.build(),
            ),
            decode: Pool::new(Role::Decode, &config.decode, config.decode_policy.build()),
            client: InstanceClient::new(&config.timeouts)?,
            timeouts: config.timeouts.clone(),
            retries: config.retries.clone(),
            health: config.health.clone(),
            metrics: metrics.clone(),
            policy_seed: config.policy_seed,
        });
        let running = metrics.gauge(&catalog::ROUTER_NUM_REQUESTS_RUNNING, &[]);
        for pool in [&orchestrator.prefill, &orchestrator.decode] {
            metrics
                .gauge(
                    &catalog::ROUTER_POLICY_INFO,
                    &[("role", pool.role.as_str()), ("policy", pool.policy_name())],
                )
                .set(1.0);
        }
        Ok(Arc::new(AppState {
            limits: config.limits.validation(),
            admission: Arc::new(Semaphore::new(
                config.limits.max_concurrent_requests as usize,
            )),
            config,
            text: Arc::new(text),
            orchestrator,
            metrics,
            pair_mismatches: parking_lot::Mutex::new(Vec::new()),
            running,
            seq: AtomicU64::new(0),
            started_unix_s: unix_now_s(),
        }))
    }

    /// Admits a request or answers 429.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorKind::RateLimited,
                format!(
                    "too many concurrent requests (limit {})",
                    self.config.limits.max_concurrent_requests
                ),
            )
            .with_code("rate_limit_exceeded")
        })?;
        self.running.increment(1.0);
        Ok(Admission {
            _permit: permit,
            running: self.running.clone(),
        })
    }

    /// Checks the requested model (absent means the served one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.config.model => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    /// Next request sequence number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// `/v1/models`: the served model; simulation facts from the first instance that reports
    /// them, else from the config.
    pub fn models(&self) -> ModelList {
        let reported = [&self.orchestrator.prefill, &self.orchestrator.decode]
            .iter()
            .flat_map(|pool| pool.instances().iter())
            .find_map(|inst| inst.stats().and_then(|s| s.sim));
        let simulation = match (reported, &self.config.simulation) {
            (Some(s), _) => ModelSimulation {
                hardware: Some(s.hardware),
                time_scale: Some(s.time_scale),
                modeled_model: Some(s.modeled_model),
                mode: Some(s.mode),
            },
            (None, Some(c)) => ModelSimulation {
                hardware: Some(c.hardware.clone()),
                time_scale: Some(c.time_scale),
                modeled_model: Some(c.modeled_model.clone()),
                mode: Some(c.mode),
            },
            (None, None) => ModelSimulation::default(),
        };
        ModelList {
            object: "list".into(),
            data: vec![ModelCard {
                id: self.config.model.clone(),
                object: "model".into(),
                created: self.started_unix_s,
                owned_by: "pdserve".into(),
                max_model_len: self.limits.max_context_tokens,
                pdserve: simulation,
            }],
        }
    }

    /// Readiness: at least one eligible instance per role.
    pub fn ready(&self) -> Result<(), ApiError> {
        for pool in [&self.orchestrator.prefill, &self.orchestrator.decode] {
            if !pool.instances().iter().any(|i| i.view().healthy) {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("no healthy {} instance", pool.role.as_str()),
                )
                .with_code("no_healthy_instance"));
            }
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
