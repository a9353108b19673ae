//! Service configuration: one serde struct per service ([`DecodeConfig`], [`PrefillConfig`]), both
//! embedding the engine's [`EngineConfig`].
//!
//! Every struct has `Default`, rejects unknown fields, and is checked by `validate`, whose
//! [`ConfigError`] names the field at fault (dotted path, e.g. `engine.time_scale`). Defaults are
//! layered by the caller (defaults < TOML < env < CLI); this module only defines and checks.

use std::net::SocketAddr;

use pdserve_engine::SchedulerConfig;
use serde::{Deserialize, Serialize};

/// An invalid setting, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: `{field}` {problem}")]
pub struct ConfigError {
    /// Dotted path of the field at fault.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(bad(field, "must be at least 1"));
    }
    Ok(())
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| {
        bad(
            field,
            format!("`{value}` is not a socket address (ip:port): {e}"),
        )
    })
}

/// The engine of one instance: scheduling, pacing and queue limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Continuous-batching scheduler (KV pool size, token budget, chunked prefill, MTP, TBO).
    pub scheduler: SchedulerConfig,
    /// Wall seconds per simulated second: a step's results are released no earlier than its start
    /// plus its simulated duration times this; 0 disables pacing.
    pub time_scale: f64,
    /// Most requests queued in the engine and not yet running; a submission beyond it is refused
    /// with 429.
    pub max_waiting_requests: usize,
    /// Capacity of the engine's command queue (submissions, cancels, stats); a submission that
    /// finds it full is refused with 429.
    pub command_queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            time_scale: 1.0,
            max_waiting_requests: 1024,
            command_queue_capacity: 4096,
        }
    }
}

impl EngineConfig {
    /// Checks every field; `prefix` is prepended to field names (e.g. `engine`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        self.scheduler
            .validate()
            .map_err(|e| bad(&format!("{prefix}.scheduler.{}", e.field), e.problem))?;
        if !self.time_scale.is_finite() || self.time_scale < 0.0 {
            return Err(bad(
                &format!("{prefix}.time_scale"),
                format!("must be a finite number >= 0, got {}", self.time_scale),
            ));
        }
        positive(
            &format!("{prefix}.max_waiting_requests"),
            self.max_waiting_requests as u64,
        )?;
        positive(
            &format!("{prefix}.command_queue_capacity"),
            self.command_queue_capacity as u64,
        )
    }
}

/// A decode instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeConfig {
    /// Stable id, reported in stats; must match the router's config.
    pub instance_id: String,
    /// `ip:port` of the internal HTTP API (`/internal/decode`, `/internal/abort`,
    /// `/internal/stats`, `/health`, `/metrics`).
    pub http_listen: String,
    /// `ip:port` of the TCP KV receiver.
    pub kv_listen: String,
    /// `host:port` that prefill instances should connect to for KV, reported in stats; `None`
    /// reports the KV listener's bound address.
    pub kv_advertise: Option<String>,
    /// The engine.
    pub engine: EngineConfig,
    /// Most requests registered and waiting for their KV plus KV frames waiting for their
    /// request; beyond it `/internal/decode` answers 429 and frames are refused (`overloaded`).
    pub max_pending_requests: usize,
    /// Most bytes of KV frames held while waiting for their decode request.
    pub max_staged_kv_bytes: u64,
    /// How long a KV frame that arrived before its decode request is kept; then it is dropped.
    pub kv_orphan_timeout_ms: u64,
    /// Largest accepted KV payload; a frame declaring more is rejected before it is read.
    pub max_kv_payload_bytes: u64,
    /// A KV connection that makes no progress for this long is closed (and a frame in progress
    /// fails its request).
    pub kv_idle_timeout_ms: u64,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            instance_id: "decode-0".to_string(),
            http_listen: "127.0.0.1:8300".to_string(),
            kv_listen: "127.0.0.1:8301".to_string(),
            kv_advertise: None,
            engine: EngineConfig::default(),
            max_pending_requests: 1024,
            max_staged_kv_bytes: 4 << 30,
            kv_orphan_timeout_ms: 30_000,
            max_kv_payload_bytes: 2 << 30,
            kv_idle_timeout_ms: 30_000,
            max_body_bytes: 64 << 20,
        }
    }
}

impl DecodeConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.instance_id.trim().is_empty() {
            return Err(bad("instance_id", "must not be empty"));
        }
        socket_addr("http_listen", &self.http_listen)?;
        socket_addr("kv_listen", &self.kv_listen)?;
        if let Some(adv) = &self.kv_advertise
            && !adv.contains(':')
        {
            return Err(bad("kv_advertise", format!("`{adv}` is not host:port")));
        }
        self.engine.validate("engine")?;
        positive("max_pending_requests", self.max_pending_requests as u64)?;
        positive("max_staged_kv_bytes", self.max_staged_kv_bytes)?;
        positive("kv_orphan_timeout_ms", self.kv_orphan_timeout_ms)?;
        positive("max_kv_payload_bytes", self.max_kv_payload_bytes)?;
        positive("kv_idle_timeout_ms", self.kv_idle_timeout_ms)?;
        positive("max_body_bytes", self.max_body_bytes as u64)
    }

    /// Binds the HTTP and KV listeners at `http_listen` and `kv_listen`.
    pub async fn bind(&self) -> std::io::Result<crate::DecodeListeners> {
        Ok(crate::DecodeListeners {
            http: tokio::net::TcpListener::bind(&self.http_listen).await?,
            kv: tokio::net::TcpListener::bind(&self.kv_listen).await?,
        })
    }
}

/// A prefill instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefillConfig {
    /// Stable id, reported in stats; must match the router's config.
    pub instance_id: String,
    /// `ip:port` of the internal HTTP API (`/internal/prefill`, `/internal/abort`,
    /// `/internal/stats`, `/health`, `/metrics`).
    pub http_listen: String,
    /// The engine.
    pub engine: EngineConfig,
    /// Connecting to a decode instance's KV receiver fails after this long (504).
    pub kv_connect_timeout_ms: u64,
    /// Writing the KV frame (excluding the paced wait for the simulated transfer time) fails after
    /// this long (504).
    pub kv_write_timeout_ms: u64,
    /// Waiting for the receiver's acknowledgement after the last byte fails after this long (504).
    pub kv_ack_timeout_ms: u64,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self {
            instance_id: "prefill-0".to_string(),
            http_listen: "127.0.0.1:8200".to_string(),
            engine: EngineConfig::default(),
            kv_connect_timeout_ms: 2_000,
            kv_write_timeout_ms: 30_000,
            kv_ack_timeout_ms: 10_000,
            max_body_bytes: 64 << 20,
        }
    }
}

impl PrefillConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.instance_id.trim().is_empty() {
            return Err(bad("instance_id", "must not be empty"));
        }
        socket_addr("http_listen", &self.http_listen)?;
        self.engine.validate("engine")?;
        positive("kv_connect_timeout_ms", self.kv_connect_timeout_ms)?;
        positive("kv_write_timeout_ms", self.kv_write_timeout_ms)?;
        positive("kv_ack_timeout_ms", self.kv_ack_timeout_ms)?;
        positive("max_body_bytes", self.max_body_bytes as u64)
    }

    /// Binds the HTTP listener at `http_listen`.
    pub async fn bind(&self) -> std::io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(&self.http_listen).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        DecodeConfig::default().validate().unwrap();
        PrefillConfig::default().validate().unwrap();
    }

    #[test]
    fn toml_fills_defaults_and_rejects_unknown_fields() {
        let c: DecodeConfig = toml::from_str(
            "instance_id = \"d1\"\n[engine]\ntime_scale = 0.5\n[engine.scheduler]\nspec_tokens = 1\n",
        )
        .unwrap();
        assert_eq!(c.instance_id, "d1");
        assert_eq!(c.engine.time_scale, 0.5);
        assert_eq!(c.engine.scheduler.spec_tokens, 1);
        assert_eq!(c.kv_listen, DecodeConfig::default().kv_listen);
        assert!(toml::from_str::<DecodeConfig>("kv_timeout = 3").is_err());
        assert!(toml::from_str::<PrefillConfig>("[engine]\nscale = 1").is_err());
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut c = DecodeConfig::default();
        c.engine.time_scale = -1.0;
        assert_eq!(c.validate().unwrap_err().field, "engine.time_scale");
        let mut c = DecodeConfig::default();
        c.engine.scheduler.num_kv_blocks = 0;
        assert_eq!(
            c.validate().unwrap_err().field,
            "engine.scheduler.num_kv_blocks"
        );
        let c = DecodeConfig {
            kv_listen: "nowhere".into(),
            ..DecodeConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "kv_listen");
        let c = DecodeConfig {
            kv_orphan_timeout_ms: 0,
            ..DecodeConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "kv_orphan_timeout_ms");
        let p = PrefillConfig {
            kv_ack_timeout_ms: 0,
            ..PrefillConfig::default()
        };
        assert_eq!(p.validate().unwrap_err().field, "kv_ack_timeout_ms");
        let mut p = PrefillConfig::default();
        p.engine.max_waiting_requests = 0;
        assert_eq!(
            p.validate().unwrap_err().field,
            "engine.max_waiting_requests"
        );
    }
}
