//! Router configuration: one serde struct, `Default` for every field, unknown keys rejected.
//!
//! The CLI layers defaults < TOML < env < flags into a [`RouterConfig`]; [`RouterConfig::validate`]
//! then checks it and names the field at fault. Durations are milliseconds (`_ms`), sizes bytes
//! (`_bytes`).

use std::collections::HashSet;
use std::path::PathBuf;

use pdserve_protocol::openai::SimMode;
use pdserve_protocol::params::Limits;
use serde::{Deserialize, Serialize};

use crate::policy::PolicyConfig;

/// Everything the router needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Public listen address (`host:port`) of the OpenAI endpoint; used by the CLI to bind.
    pub listen: String,
    /// The model name served (what clients put in `model` and `/v1/models` lists).
    pub model: String,
    /// `tokenizer.json`, or a directory holding `tokenizer.json` and `tokenizer_config.json`
    /// (which supplies `chat_template`, `bos_token`, `eos_token`).
    pub tokenizer: PathBuf,
    /// Inline Jinja chat template; overrides `tokenizer_config.json`'s `chat_template`.
    pub chat_template: Option<String>,
    /// Prefill instances.
    pub prefill: Vec<InstanceConfig>,
    /// Decode instances.
    pub decode: Vec<InstanceConfig>,
    /// How a prefill instance is chosen.
    pub prefill_policy: PolicyConfig,
    /// How a decode instance is chosen.
    pub decode_policy: PolicyConfig,
    /// Stage timeouts.
    pub timeouts: TimeoutConfig,
    /// Retries of the prefill leg.
    pub retries: RetryConfig,
    /// Health checking of instances.
    pub health: HealthConfig,
    /// Accepted bearer keys on `/v1/*`; empty disables authentication.
    pub api_keys: Vec<String>,
    /// Request limits.
    pub limits: LimitsConfig,
    /// What `/v1/models` reports when no instance reports its simulation (instances win).
    pub simulation: Option<SimulationConfig>,
    /// Seed of the policies' random choices (power of two choices).
    pub policy_seed: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: "127.0.0.1:8000".to_string(),
            model: "deepseek-v3-tiny".to_string(),
            tokenizer: PathBuf::from("config/models"),
            chat_template: None,
            prefill: Vec::new(),
            decode: Vec::new(),
            prefill_policy: PolicyConfig::default_prefill(),
            decode_policy: PolicyConfig::default_decode(),
            timeouts: TimeoutConfig::default(),
            retries: RetryConfig::default(),
            health: HealthConfig::default(),
            api_keys: Vec::new(),
            limits: LimitsConfig::default(),
            simulation: None,
            policy_seed: 0,
        }
    }
}

/// One instance the router sends work to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Stable id (labels, headers, the `pdserve` extension).
    pub id: String,
    /// Base URL of its internal HTTP API, e.g. `http://127.0.0.1:9100`.
    pub url: String,
    /// Decode only: `host:port` of its KV receiver; when absent, taken from its `/internal/stats`.
    #[serde(default)]
    pub kv_addr: Option<String>,
}

/// Stage timeouts, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// TCP connect to an instance.
    pub connect_ms: u64,
    /// Opening a decode stream (until its response head arrives).
    pub decode_open_ms: u64,
    /// One prefill attempt (request sent to answer received).
    pub prefill_ms: u64,
    /// Sent to decode as `kv_timeout_ms`: registration to KV frame received.
    pub kv_transfer_ms: u64,
    /// Dispatch to the first token from decode.
    pub first_token_ms: u64,
    /// Longest gap between two decode events.
    pub inter_token_ms: u64,
    /// Arrival to the end of the whole request.
    pub total_ms: u64,
    /// One health or stats probe.
    pub probe_ms: u64,
    /// Abort calls (fire and forget).
    pub abort_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect_ms: 1_000,
            decode_open_ms: 5_000,
            prefill_ms: 60_000,
            kv_transfer_ms: 60_000,
            first_token_ms: 120_000,
            inter_token_ms: 30_000,
            total_ms: 1_800_000,
            probe_ms: 2_000,
            abort_ms: 2_000,
        }
    }
}

/// Retries on another instance, only while nothing is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Prefill attempts per generation, first included (≥ 1), each on a different instance;
    /// retried only until decode emitted its first token.
    pub prefill_attempts: u32,
    /// Attempts to open a decode stream (≥ 1), each on a different instance (connect errors,
    /// 5xx, 429, timeouts of the response head).
    pub decode_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            prefill_attempts: 3,
            decode_attempts: 2,
        }
    }
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Period of the `GET /health` + `GET /internal/stats` probe of every instance.
    pub interval_ms: u64,
    /// Consecutive failures (probes or request legs) that mark an instance unhealthy.
    pub unhealthy_after_failures: u32,
    /// Consecutive successful probes that mark an unhealthy instance healthy again.
    pub healthy_after_successes: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1_000,
            unhealthy_after_failures: 3,
            healthy_after_successes: 2,
        }
    }
}

/// Request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest `n` (and prompts × n for completions).
    pub max_n: u32,
    /// Largest `top_logprobs` / `logprobs`.
    pub max_top_logprobs: u8,
    /// Largest number of stop strings.
    pub max_stop_strings: usize,
    /// Context length (prompt + completion tokens).
    pub max_context_tokens: u32,
    /// Requests in flight at once; more get 429.
    pub max_concurrent_requests: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 4 * 1024 * 1024,
            max_n: 16,
            max_top_logprobs: 20,
            max_stop_strings: 4,
            max_context_tokens: 4096,
            max_concurrent_requests: 4096,
        }
    }
}

impl LimitsConfig {
    /// The validation limits of the protocol crate.
    pub fn validation(&self) -> Limits {
        Limits {
            max_n: self.max_n,
            max_top_logprobs: self.max_top_logprobs,
            max_stop_strings: self.max_stop_strings,
            max_context_tokens: self.max_context_tokens,
        }
    }
}

/// Fallback simulation description for `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationConfig {
    /// Hardware profile name.
    pub hardware: String,
    /// Wall seconds per simulated second.
    pub time_scale: f64,
    /// Modeled model name.
    pub modeled_model: String,
    /// Fabric mode.
    pub mode: SimMode,
}

/// A configuration error naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("router config: `{field}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `decode[1].url`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn config_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

impl RouterConfig {
    /// Checks the config; the error names the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.trim().is_empty() {
            return Err(config_error("model", "must not be empty"));
        }
        for (field, list) in [("prefill", &self.prefill), ("decode", &self.decode)] {
            if list.is_empty() {
                return Err(config_error(field, "at least one instance is required"));
            }
            let mut seen = HashSet::new();
            for (i, inst) in list.iter().enumerate() {
                if inst.id.is_empty() {
                    return Err(config_error(
                        format!("{field}[{i}].id"),
                        "must not be empty",
                    ));
                }
                if !seen.insert(inst.id.as_str()) {
                    return Err(config_error(
                        format!("{field}[{i}].id"),
                        format!("duplicate id `{}`", inst.id),
                    ));
                }
                if !(inst.url.starts_with("http://") || inst.url.starts_with("https://")) {
                    return Err(config_error(
                        format!("{field}[{i}].url"),
                        format!("`{}` is not an http(s) URL", inst.url),
                    ));
                }
            }
        }
        self.prefill_policy.validate("prefill_policy")?;
        self.decode_policy.validate("decode_policy")?;
        let t = &self.timeouts;
        for (name, v) in [
            ("connect_ms", t.connect_ms),
            ("decode_open_ms", t.decode_open_ms),
            ("prefill_ms", t.prefill_ms),
            ("kv_transfer_ms", t.kv_transfer_ms),
            ("first_token_ms", t.first_token_ms),
            ("inter_token_ms", t.inter_token_ms),
            ("total_ms", t.total_ms),
            ("probe_ms", t.probe_ms),
            ("abort_ms", t.abort_ms),
        ] {
            if v == 0 {
                return Err(config_error(format!("timeouts.{name}"), "must be positive"));
            }
        }
        if self.retries.prefill_attempts == 0 {
            return Err(config_error(
                "retries.prefill_attempts",
                "must be at least 1",
            ));
        }
        if self.health.interval_ms == 0 {
            return Err(config_error("health.interval_ms", "must be positive"));
        }
        if self.health.unhealthy_after_failures == 0 || self.health.healthy_after_successes == 0 {
            return Err(config_error(
                "health",
                "unhealthy_after_failures and healthy_after_successes must be at least 1",
            ));
        }
        let l = &self.limits;
        if l.max_body_bytes == 0 {
            return Err(config_error("limits.max_body_bytes", "must be positive"));
        }
        if l.max_n == 0 {
            return Err(config_error("limits.max_n", "must be at least 1"));
        }
        if l.max_context_tokens < 2 {
            return Err(config_error(
                "limits.max_context_tokens",
                "must be at least 2",
            ));
        }
        if l.max_concurrent_requests == 0 {
            return Err(config_error(
                "limits.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        if self.api_keys.iter().any(String::is_empty) {
            return Err(config_error("api_keys", "keys must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RouterConfig {
        RouterConfig {
            prefill: vec![InstanceConfig {
                id: "p0".into(),
                url: "http://127.0.0.1:1".into(),
                kv_addr: None,
            }],
            decode: vec![InstanceConfig {
                id: "d0".into(),
                url: "http://127.0.0.1:2".into(),
                kv_addr: None,
            }],
            ..RouterConfig::default()
        }
    }

    #[test]
    fn a_minimal_config_validates() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = valid();
        c.decode.push(c.decode[0].clone());
        assert_eq!(c.validate().unwrap_err().field, "decode[1].id");
        let mut c = valid();
        c.prefill[0].url = "127.0.0.1:1".into();
        assert_eq!(c.validate().unwrap_err().field, "prefill[0].url");
        let mut c = valid();
        c.timeouts.inter_token_ms = 0;
        assert_eq!(c.validate().unwrap_err().field, "timeouts.inter_token_ms");
        let mut c = valid();
        c.prefill.clear();
        assert_eq!(c.validate().unwrap_err().field, "prefill");
    }

    #[test]
    fn unknown_keys_are_rejected_and_missing_keys_default() {
        let c: RouterConfig = serde_json::from_str(r#"{"model": "m"}"#).unwrap();
        assert_eq!(c.limits.max_body_bytes, 4 * 1024 * 1024);
        assert!(serde_json::from_str::<RouterConfig>(r#"{"modle": "m"}"#).is_err());
        assert!(serde_json::from_str::<RouterConfig>(r#"{"timeouts": {"total": 1}}"#).is_err());
    }
}
