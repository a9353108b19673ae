//! The router's view of its instances: health, last reported stats, and its own in-flight
//! accounting, grouped in one [`Pool`] per role with that role's policy.
//!
//! Invariants:
//! - an instance becomes unhealthy after `unhealthy_after_failures` consecutive failures (failed
//!   probes or failed request legs) and healthy again after `healthy_after_successes` consecutive
//!   successful probes; a successful request leg resets the failure count. Instances start healthy
//!   (`serve` probes them all before accepting requests);
//! - a decode instance is eligible only while its KV address is known (config or stats);
//! - in-flight counts are changed only through [`InflightGuard`], so they return to zero when every
//!   request is done, whatever path it took.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use pdserve_protocol::internal::{InstanceStats, Role};
use rand::RngCore;

use crate::config::{HealthConfig, InstanceConfig};
use crate::policy::{InstanceView, Policy, RequestFeatures};

#[derive(Debug, Clone)]
struct HealthState {
    healthy: bool,
    consecutive_failures: u32,
    consecutive_successes: u32,
    stats: Option<InstanceStats>,
}

/// One prefill or decode instance.
#[derive(Debug)]
pub struct Instance {
    /// Id from the config.
    pub id: Arc<str>,
    /// Role.
    pub role: Role,
    base_url: String,
    configured_kv_addr: Option<String>,
    state: Mutex<HealthState>,
    inflight_requests: AtomicU32,
    inflight_tokens: AtomicU64,
}

impl Instance {
    /// An instance from its config entry.
    pub fn new(role: Role, config: &InstanceConfig) -> Instance {
        Instance {
            id: Arc::from(config.id.as_str()),
            role,
            base_url: config.url.trim_end_matches('/').to_string(),
            configured_kv_addr: config.kv_addr.clone(),
            state: Mutex::new(HealthState {
                healthy: true,
                consecutive_failures: 0,
                consecutive_successes: 0,
                stats: None,
            }),
            inflight_requests: AtomicU32::new(0),
            inflight_tokens: AtomicU64::new(0),
        }
    }

    /// Full URL of `path` on this instance.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Where prefill must push KV for this (decode) instance: the config's address, else the one
    /// its stats report.
    pub fn kv_addr(&self) -> Option<String> {
        self.configured_kv_addr.clone().or_else(|| {
            self.state
                .lock()
                .stats
                .as_ref()
                .and_then(|s| s.kv_addr.clone())
        })
    }

    /// Last reported stats.
    pub fn stats(&self) -> Option<InstanceStats> {
        self.state.lock().stats.clone()
    }

    /// Requests this router has in flight on the instance.
    pub fn inflight_requests(&self) -> u32 {
        self.inflight_requests.load(Ordering::Relaxed)
    }

    /// The policy's view of this instance.
    pub fn view(&self) -> InstanceView {
        let state = self.state.lock();
        let stats = state.stats.as_ref();
        let kv_known = self.role != Role::Decode
            || self.configured_kv_addr.is_some()
            || stats.is_some_and(|s| s.kv_addr.is_some());
        InstanceView {
            id: self.id.clone(),
            healthy: state.healthy && kv_known,
            running: stats.map_or(0, |s| s.running),
            waiting: stats.map_or(0, |s| s.waiting),
            queued_prompt_tokens: stats.map_or(0, |s| s.queued_prompt_tokens),
            kv_usage: stats.map_or(0.0, |s| s.kv_usage),
            inflight_requests: self.inflight_requests.load(Ordering::Relaxed),
            inflight_tokens: self.inflight_tokens.load(Ordering::Relaxed),
        }
    }

    /// Counts a request of `prompt_tokens` in flight until the guard drops.
    pub fn track(self: &Arc<Self>, prompt_tokens: u64) -> InflightGuard {
        self.inflight_requests.fetch_add(1, Ordering::Relaxed);
        self.inflight_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        InflightGuard {
            instance: self.clone(),
            tokens: prompt_tokens,
        }
    }

    /// A successful probe (with the stats it returned). Returns `Some(healthy)` on a transition.
    pub fn probe_succeeded(&self, stats: InstanceStats, health: &HealthConfig) -> Option<bool> {
        let mut s = self.state.lock();
        s.stats = Some(stats);
        s.consecutive_failures = 0;
        s.consecutive_successes = s.consecutive_successes.saturating_add(1);
        if !s.healthy && s.consecutive_successes >= health.healthy_after_successes {
            s.healthy = true;
            return Some(true);
        }
        None
    }

    /// A failed probe or request leg. Returns `Some(false)` on a transition to unhealthy.
    pub fn failed(&self, health: &HealthConfig) -> Option<bool> {
        let mut s = self.state.lock();
        s.consecutive_successes = 0;
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        if s.healthy && s.consecutive_failures >= health.unhealthy_after_failures {
            s.healthy = false;
            return Some(false);
        }
        None
    }

    /// A successful request leg: clears the failure streak (does not by itself revive an
    /// unhealthy instance; probes do).
    pub fn leg_succeeded(&self) {
        self.state.lock().consecutive_failures = 0;
    }
}

/// Keeps a request counted in its instance's in-flight numbers while alive.
#[derive(Debug)]
pub struct InflightGuard {
    instance: Arc<Instance>,
    tokens: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.instance
            .inflight_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.instance
            .inflight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// The instances of one role and the policy that chooses among them.
#[derive(Debug)]
pub struct Pool {
    /// Role of every instance.
    pub role: Role,
    instances: Vec<Arc<Instance>>,
    policy: Box<dyn Policy>,
}

impl Pool {
    /// A pool over the configured instances.
    pub fn new(role: Role, configs: &[InstanceConfig], policy: Box<dyn Policy>) -> Pool {
        Pool {
            role,
            instances: configs
                .iter()
                .map(|c| Arc::new(Instance::new(role, c)))
                .collect(),
            policy,
        }
    }

    /// The instances.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Asks the policy for an instance, treating those in `exclude` as ineligible.
    pub fn select(
        &self,
        request: &RequestFeatures<'_>,
        exclude: &[Arc<str>],
        rng: &mut dyn RngCore,
    ) -> Option<Arc<Instance>> {
        let views: Vec<InstanceView> = self
            .instances
            .iter()
            .map(|inst| {
                let mut v = inst.view();
                if exclude.contains(&inst.id) {
                    v.healthy = false;
                }
                v
            })
            .collect();
        let i = self.policy.select(&views, request, rng)?;
        // A policy must not pick an ineligible view; treat a violation as "no choice".
        views
            .get(i)
            .filter(|v| v.healthy)
            .and_then(|_| self.instances.get(i).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RoundRobin;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn config(id: &str) -> InstanceConfig {
        InstanceConfig {
            id: id.into(),
            url: "http://127.0.0.1:1/".into(),
            kv_addr: None,
        }
    }

    fn stats(id: &str, kv_addr: Option<&str>) -> InstanceStats {
        InstanceStats {
            instance_id: id.into(),
            role: Role::Decode,
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            kv_blocks_free: 1,
            kv_blocks_total: 1,
            queued_prompt_tokens: 0,
            kv_addr: kv_addr.map(String::from),
            max_model_len: None,
            kv_layers: None,
            sim: None,
        }
    }

    #[test]
    fn failures_mark_unhealthy_and_probes_revive() {
        let h = HealthConfig {
            interval_ms: 1,
            unhealthy_after_failures: 2,
            healthy_after_successes: 2,
        };
        let inst = Instance::new(Role::Prefill, &config("p0"));
        assert_eq!(inst.url("/health"), "http://127.0.0.1:1/health");
        assert_eq!(inst.failed(&h), None);
        inst.leg_succeeded();
        assert_eq!(inst.failed(&h), None);
        assert_eq!(inst.failed(&h), Some(false));
        assert!(!inst.view().healthy);
        assert_eq!(inst.probe_succeeded(stats("p0", None), &h), None);
        assert_eq!(inst.probe_succeeded(stats("p0", None), &h), Some(true));
        assert!(inst.view().healthy);
    }

    #[test]
    fn a_decode_instance_without_kv_address_is_not_eligible() {
        let inst = Instance::new(Role::Decode, &config("d0"));
        assert!(!inst.view().healthy);
        inst.probe_succeeded(stats("d0", Some("127.0.0.1:5")), &HealthConfig::default());
        assert!(inst.view().healthy);
        assert_eq!(inst.kv_addr().as_deref(), Some("127.0.0.1:5"));
    }

    #[test]
    fn inflight_counts_follow_guards() {
        let inst = Arc::new(Instance::new(Role::Prefill, &config("p0")));
        let a = inst.track(10);
        let b = inst.track(5);
        assert_eq!(
            (inst.view().inflight_requests, inst.view().inflight_tokens),
            (2, 15)
        );
        drop(a);
        drop(b);
        assert_eq!(
            (inst.view().inflight_requests, inst.view().inflight_tokens),
            (0, 0)
        );
    }

    #[test]
    fn excluded_instances_are_skipped() {
        let pool = Pool::new(
            Role::Prefill,
            &[config("a"), config("b")],
            Box::new(RoundRobin),
        );
        let req = RequestFeatures {
            seq: 0,
            prompt_token_ids: &[],
        };
        let mut rng = StdRng::seed_from_u64(0);
        let first = pool.select(&req, &[], &mut rng).unwrap();
        assert_eq!(&*first.id, "a");
        let second = pool
            .select(&req, std::slice::from_ref(&first.id), &mut rng)
            .unwrap();
        assert_eq!(&*second.id, "b");
        assert!(
            pool.select(&req, &[Arc::from("a"), Arc::from("b")], &mut rng)
                .is_none()
        );
    }
}
