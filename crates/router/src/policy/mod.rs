//! Instance selection policies: pure functions from a snapshot of instances to a choice.
//!
//! A [`Policy`] sees a slice of [`InstanceView`]s (health, load signals reported by the instance,
//! and the router's own in-flight accounting) and the request's [`RequestFeatures`], plus a seeded
//! random source it must use for any randomness. It does no I/O and reads no clock, so each policy
//! is unit-tested without a runtime. Prefill and decode each have their own policy.
//!
//! Invariants: a policy returns `None` only when no view is healthy, and never returns the index of
//! an unhealthy view (the orchestrator marks instances it must avoid, e.g. a prefill instance that
//! already failed this request, as unhealthy in the slice it passes).
//!
//! Implementations: [`RoundRobin`] (the simple stand-in), [`LeastLoad`] (token work + KV pressure),
//! [`PowerOfTwo`] (two random candidates, the less loaded wins) and [`CacheAware`] (prefix affinity
//! with an imbalance guard).

mod cache_aware;
mod least_load;
mod power_of_two;
mod round_robin;

use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use cache_aware::{BLOCK_TOKENS, CacheAware, CacheAwareConfig, prefix_hash};
pub use least_load::{LeastLoad, LeastLoadConfig, load_score};
pub use power_of_two::PowerOfTwo;
pub use round_robin::RoundRobin;

use crate::config::ConfigError;

/// What a policy knows about one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// Instance id.
    pub id: Arc<str>,
    /// Eligible at all (healthy, and not excluded for this request).
    pub healthy: bool,
    /// Requests running on the instance (last stats).
    pub running: u32,
    /// Requests queued on the instance (last stats).
    pub waiting: u32,
    /// Prompt tokens queued on the instance (last stats).
    pub queued_prompt_tokens: u64,
    /// KV pool usage 0..=1 (last stats).
    pub kv_usage: f64,
    /// Requests this router has in flight on the instance (always current).
    pub inflight_requests: u32,
    /// Prompt tokens of those requests (always current).
    pub inflight_tokens: u64,
}

impl InstanceView {
    /// A healthy, idle view (tests and defaults).
    pub fn idle(id: &str) -> InstanceView {
        InstanceView {
            id: Arc::from(id),
            healthy: true,
            running: 0,
            waiting: 0,
            queued_prompt_tokens: 0,
            kv_usage: 0.0,
            inflight_requests: 0,
            inflight_tokens: 0,
        }
    }
}

/// What a policy knows about the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFeatures<'a> {
    /// The router's request sequence number (round robin's position).
    pub seq: u64,
    /// The prompt.
    pub prompt_token_ids: &'a [u32],
}

/// Chooses an instance for a request.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Short name (metric label).
    fn name(&self) -> &'static str;

    /// Index into `instances` of the chosen one; `None` when none is healthy.
    fn select(
        &self,
        instances: &[InstanceView],
        request: &RequestFeatures<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<usize>;
}

/// Policy configuration (TOML: `kind = "cache_aware"` plus the variant's fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicyConfig {
    /// Healthy instances in turn.
    RoundRobin,
    /// Lowest load score.
    LeastLoad(LeastLoadConfig),
    /// Two random healthy instances; the lower load score wins.
    PowerOfTwo(LeastLoadConfig),
    /// Prefix affinity with an imbalance guard.
    CacheAware(CacheAwareConfig),
}

impl PolicyConfig {
    /// Default for prefill: cache-aware (prefix reuse lives on the prefill side).
    pub fn default_prefill() -> PolicyConfig {
        PolicyConfig::CacheAware(CacheAwareConfig::default())
    }

    /// Default for decode: least load (KV pressure matters most there).
    pub fn default_decode() -> PolicyConfig {
        PolicyConfig::LeastLoad(LeastLoadConfig::default())
    }

    /// Checks the numbers; `field` prefixes the error's field path.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let err = |name: &str, message: &str| ConfigError {
            field: format!("{field}.{name}"),
            message: message.to_string(),
        };
        let kv_weight = match self {
            PolicyConfig::RoundRobin => return Ok(()),
            PolicyConfig::LeastLoad(c) | PolicyConfig::PowerOfTwo(c) => c.kv_weight_tokens,
            PolicyConfig::CacheAware(c) => {
                if c.prefix_tokens < BLOCK_TOKENS {
                    return Err(err(
                        "prefix_tokens",
                        "must be at least one block (64 tokens)",
                    ));
                }
                if !(c.balance_rel.is_finite() && c.balance_rel >= 1.0) {
                    return Err(err("balance_rel", "must be a finite number ≥ 1"));
                }
                c.kv_weight_tokens
            }
        };
        if !(kv_weight.is_finite() && kv_weight >= 0.0) {
            return Err(err("kv_weight_tokens", "must be a finite number ≥ 0"));
        }
        Ok(())
    }

    /// Builds the policy.
    pub fn build(&self) -> Box<dyn Policy> {
        match self {
            PolicyConfig::RoundRobin => Box::new(RoundRobin),
            PolicyConfig::LeastLoad(c) => Box::new(LeastLoad::new(c.clone())),
            PolicyConfig::PowerOfTwo(c) => Box::new(PowerOfTwo::new(c.clone())),
            PolicyConfig::CacheAware(c) => Box::new(CacheAware::new(c.clone())),
        }
    }
}

/// Indices of the healthy views.
pub(crate) fn healthy_indices(instances: &[InstanceView]) -> Vec<usize> {
    instances
        .iter()
        .enumerate()
        .filter(|(_, v)| v.healthy)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_config_reads_from_tagged_json() {
        let c: PolicyConfig = serde_json::from_str(r#"{"kind": "round_robin"}"#).unwrap();
        assert_eq!(c, PolicyConfig::RoundRobin);
        let c: PolicyConfig =
            serde_json::from_str(r#"{"kind": "cache_aware", "prefix_tokens": 128}"#).unwrap();
        let PolicyConfig::CacheAware(ca) = c else {
            panic!("expected cache_aware");
        };
        assert_eq!(ca.prefix_tokens, 128);
        assert_eq!(ca.balance_rel, CacheAwareConfig::default().balance_rel);
        assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind": "least_load", "x": 1}"#).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let c = PolicyConfig::CacheAware(CacheAwareConfig {
            prefix_tokens: 10,
            ..CacheAwareConfig::default()
        });
        assert_eq!(
            c.validate("prefill_policy").unwrap_err().field,
            "prefill_policy.prefix_tokens"
        );
    }
}
