//! Least load: the instance with the lowest load score wins.
//!
//! `load_score = work_tokens + kv_weight_tokens × k / (1 − k)` where `work_tokens` is the larger of
//! the instance-reported queued prompt tokens and the router's own in-flight prompt tokens on it
//! (stats lag by a probe period; the router's count is current but blind to other routers), and
//! `k` is the KV usage clamped to 0.99. The KV term is a convex barrier: it is small until the pool
//! fills, then dominates, so a nearly full decode instance stops receiving work.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{InstanceView, Policy, RequestFeatures};

/// Least-load parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeastLoadConfig {
    /// Token-equivalent weight of KV pressure (the score adds `w × k/(1−k)`; at 50% usage an
    /// instance counts as `w` tokens busier).
    pub kv_weight_tokens: f64,
}

impl Default for LeastLoadConfig {
    fn default() -> Self {
        LeastLoadConfig {
            kv_weight_tokens: 1024.0,
        }
    }
}

/// The load score of one instance (lower is less loaded).
pub fn load_score(view: &InstanceView, kv_weight_tokens: f64) -> f64 {
    let work = view.queued_prompt_tokens.max(view.inflight_tokens) as f64;
    let k = if view.kv_usage.is_finite() {
        view.kv_usage.clamp(0.0, 0.99)
    } else {
        0.99
    };
    work + kv_weight_tokens * k / (1.0 - k)
}

/// Index of the least-loaded healthy view; ties go to fewer in-flight requests, then the lower
/// index.
pub(crate) fn least_loaded(instances: &[InstanceView], kv_weight_tokens: f64) -> Option<usize> {
    instances
        .iter()
        .enumerate()
        .filter(|(_, v)| v.healthy)
        .min_by(|(ia, a), (ib, b)| {
            load_score(a, kv_weight_tokens)
                .total_cmp(&load_score(b, kv_weight_tokens))
                .then(a.inflight_requests.cmp(&b.inflight_requests))
                .then(ia.cmp(ib))
        })
        .map(|(i, _)| i)
}

/// Least-load policy.
#[derive(Debug, Clone)]
pub struct LeastLoad {
    config: LeastLoadConfig,
}

impl LeastLoad {
    /// A least-load policy.
    pub fn new(config: LeastLoadConfig) -> Self {
        LeastLoad { config }
    }
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }

    fn select(
        &self,
        instances: &[InstanceView],
        _request: &RequestFeatures<'_>,
        _rng: &mut dyn RngCore,
    ) -> Option<usize> {
        least_loaded(instances, self.config.kv_weight_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn pick(views: &[InstanceView]) -> Option<usize> {
        let req = RequestFeatures {
            seq: 0,
            prompt_token_ids: &[],
        };
        LeastLoad::new(LeastLoadConfig::default()).select(
            views,
            &req,
            &mut StdRng::seed_from_u64(1),
        )
    }

    #[test]
    fn the_instance_with_least_token_work_wins() {
        let mut views: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        views[0].queued_prompt_tokens = 500;
        views[1].inflight_tokens = 100;
        views[2].queued_prompt_tokens = 300;
        assert_eq!(pick(&views), Some(1));
    }

    #[test]
    fn kv_pressure_outweighs_a_small_queue() {
        let mut views: Vec<_> = ["a", "b"].iter().map(|id| InstanceView::idle(id)).collect();
        views[0].kv_usage = 0.95; // 1024 × 19 ≈ 19k tokens of pressure
        views[1].queued_prompt_tokens = 2_000;
        assert_eq!(pick(&views), Some(1));
        views[0].kv_usage = 0.1; // ≈ 114 tokens
        assert_eq!(pick(&views), Some(0));
    }

    #[test]
    fn assignments_spread_as_in_flight_work_accumulates() {
        // Simulate the router's own accounting: each pick adds 100 in-flight tokens.
        let mut views: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        let mut counts = [0usize; 3];
        for _ in 0..30 {
            let i = pick(&views).unwrap();
            counts[i] += 1;
            views[i].inflight_tokens += 100;
            views[i].inflight_requests += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn unhealthy_instances_are_never_chosen() {
        let mut views: Vec<_> = ["a", "b"].iter().map(|id| InstanceView::idle(id)).collect();
        views[1].queued_prompt_tokens = 1_000_000;
        views[0].healthy = false;
        assert_eq!(pick(&views), Some(1));
        views[1].healthy = false;
        assert_eq!(pick(&views), None);
    }

    #[test]
    fn a_non_finite_kv_usage_counts_as_full() {
        let mut v = InstanceView::idle("a");
        v.kv_usage = f64::NAN;
        assert!(load_score(&v, 1.0) > 98.0);
    }
}
