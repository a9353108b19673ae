//! The router's Prometheus metrics: every name is a constant in [`names`], recorded through
//! [`RouterMetrics`] into a registry owned by the router (not a process-global recorder, so several
//! routers, or tests, in one process keep separate counts) and rendered on `/metrics`.
//!
//! Conventions (DESIGN §8): `pdserve_router_<what>_<unit>`, counters end in `_total`, durations in
//! `_seconds`; labels are bounded: `endpoint` (a fixed set), `status` (HTTP code), `role`
//! (`prefill`/`decode`), `instance` (ids from the config), `reason`/`stage` (fixed sets).

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Metric names.
pub mod names {
    /// Counter `{endpoint, status}`: requests answered, by HTTP status.
    pub const REQUESTS_TOTAL: &str = "pdserve_router_requests_total";
    /// Gauge: requests in flight.
    pub const NUM_REQUESTS_RUNNING: &str = "pdserve_router_num_requests_running";
    /// Histogram: arrival to first token (per generated choice).
    pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "pdserve_router_time_to_first_token_seconds";
    /// Histogram: gap between decode events, divided over the tokens of the later event.
    pub const INTER_TOKEN_LATENCY_SECONDS: &str = "pdserve_router_inter_token_latency_seconds";
    /// Histogram: arrival to end of a generation.
    pub const E2E_REQUEST_LATENCY_SECONDS: &str = "pdserve_router_e2e_request_latency_seconds";
    /// Histogram: time queued at the prefill instance (reported by prefill).
    pub const REQUEST_QUEUE_TIME_SECONDS: &str = "pdserve_router_request_queue_time_seconds";
    /// Histogram: prefill compute (reported by prefill).
    pub const REQUEST_PREFILL_TIME_SECONDS: &str = "pdserve_router_request_prefill_time_seconds";
    /// Histogram: KV transfer prefill → decode (reported by prefill).
    pub const KV_TRANSFER_TIME_SECONDS: &str = "pdserve_router_kv_transfer_time_seconds";
    /// Histogram: first token to last token of a generation.
    pub const REQUEST_DECODE_TIME_SECONDS: &str = "pdserve_router_request_decode_time_seconds";
    /// Histogram: router work before dispatch (parse, validate, tokenize, select).
    pub const ROUTER_OVERHEAD_SECONDS: &str = "pdserve_router_overhead_seconds";
    /// Counter: prompt tokens of answered requests.
    pub const PROMPT_TOKENS_TOTAL: &str = "pdserve_router_prompt_tokens_total";
    /// Counter: generated tokens of answered requests.
    pub const GENERATION_TOKENS_TOTAL: &str = "pdserve_router_generation_tokens_total";
    /// Counter: prompt tokens served from prefill prefix caches.
    pub const CACHED_TOKENS_TOTAL: &str = "pdserve_router_cached_tokens_total";
    /// Counter `{role, instance, policy}`: routing decisions.
    pub const ROUTING_DECISIONS_TOTAL: &str = "pdserve_router_routing_decisions_total";
    /// Counter `{role, reason}`: legs retried on another instance (prefill: before decode
    /// committed; decode: opening the stream).
    pub const RETRIES_TOTAL: &str = "pdserve_router_retries_total";
    /// Counter `{role, reason}`: abort calls sent to instances.
    pub const ABORTS_TOTAL: &str = "pdserve_router_aborts_total";
    /// Counter `{stage}`: stage timeouts.
    pub const STAGE_TIMEOUTS_TOTAL: &str = "pdserve_router_stage_timeouts_total";
    /// Counter `{reason}`: generations that failed.
    pub const GENERATION_FAILURES_TOTAL: &str = "pdserve_router_generation_failures_total";
    /// Gauge `{role, instance}`: 1 when the instance is eligible for routing.
    pub const INSTANCE_HEALTHY: &str = "pdserve_router_instance_healthy";
    /// Gauge `{role, instance}`: requests this router has in flight on the instance.
    pub const INSTANCE_INFLIGHT_REQUESTS: &str = "pdserve_router_instance_inflight_requests";
    /// Gauge `{role, instance}`: KV usage the instance last reported (0..1).
    pub const INSTANCE_KV_CACHE_USAGE_PERC: &str = "pdserve_router_instance_kv_cache_usage_perc";
}

use names::*;

const LATENCY_BUCKETS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
const ITL_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const OVERHEAD_BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The router's metrics registry.
pub struct RouterMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

impl RouterMetrics {
    /// A fresh registry with histogram buckets and descriptions.
    pub fn new() -> Result<RouterMetrics, BuildError> {
        let mut builder = PrometheusBuilder::new();
        let histograms: [(&str, &[f64]); 8] = [
            (TIME_TO_FIRST_TOKEN_SECONDS, LATENCY_BUCKETS_S),
            (INTER_TOKEN_LATENCY_SECONDS, ITL_BUCKETS_S),
            (E2E_REQUEST_LATENCY_SECONDS, LATENCY_BUCKETS_S),
            (REQUEST_QUEUE_TIME_SECONDS, LATENCY_BUCKETS_S),
            (REQUEST_PREFILL_TIME_SECONDS, LATENCY_BUCKETS_S),
            (KV_TRANSFER_TIME_SECONDS, LATENCY_BUCKETS_S),
            (REQUEST_DECODE_TIME_SECONDS, LATENCY_BUCKETS_S),
            (ROUTER_OVERHEAD_SECONDS, OVERHEAD_BUCKETS_S),
        ];
        for (name, buckets) in histograms {
            builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let m = RouterMetrics { recorder, handle };
        m.describe();
        Ok(m)
    }

    fn describe(&self) {
        let r = &self.recorder;
        let d = |name: &'static str, unit: Option<Unit>, help: &'static str| (name, unit, help);
        for (name, unit, help) in [
            d(
                REQUESTS_TOTAL,
                None,
                "Requests answered, by endpoint and HTTP status.",
            ),
            d(
                PROMPT_TOKENS_TOTAL,
                None,
                "Prompt tokens of answered requests.",
            ),
            d(
                GENERATION_TOKENS_TOTAL,
                None,
                "Generated tokens of answered requests.",
            ),
            d(
                CACHED_TOKENS_TOTAL,
                None,
                "Prompt tokens served from prefix caches.",
            ),
            d(
                ROUTING_DECISIONS_TOTAL,
                None,
                "Instances chosen, by role, instance and policy.",
            ),
            d(
                RETRIES_TOTAL,
                None,
                "Legs retried on another instance, by role.",
            ),
            d(ABORTS_TOTAL, None, "Abort calls sent to instances."),
            d(STAGE_TIMEOUTS_TOTAL, None, "Stage timeouts, by stage."),
            d(
                GENERATION_FAILURES_TOTAL,
                None,
                "Failed generations, by reason.",
            ),
        ] {
            r.describe_counter(KeyName::from(name), unit, help.into());
        }
        for (name, help) in [
            (TIME_TO_FIRST_TOKEN_SECONDS, "Arrival to first token."),
            (INTER_TOKEN_LATENCY_SECONDS, "Gap between tokens."),
            (E2E_REQUEST_LATENCY_SECONDS, "Arrival to end of generation."),
            (
                REQUEST_QUEUE_TIME_SECONDS,
                "Time queued at the prefill instance.",
            ),
            (REQUEST_PREFILL_TIME_SECONDS, "Prefill compute time."),
            (
                KV_TRANSFER_TIME_SECONDS,
                "KV transfer time from prefill to decode.",
            ),
            (REQUEST_DECODE_TIME_SECONDS, "First token to last token."),
            (ROUTER_OVERHEAD_SECONDS, "Router work before dispatch."),
        ] {
            r.describe_histogram(KeyName::from(name), Some(Unit::Seconds), help.into());
        }
        for (name, help) in [
            (NUM_REQUESTS_RUNNING, "Requests in flight at the router."),
            (
                INSTANCE_HEALTHY,
                "1 when the instance is eligible for routing.",
            ),
            (
                INSTANCE_INFLIGHT_REQUESTS,
                "Requests this router has in flight on the instance.",
            ),
            (
                INSTANCE_KV_CACHE_USAGE_PERC,
                "KV usage reported by the instance (0..1).",
            ),
        ] {
            r.describe_gauge(KeyName::from(name), None, help.into());
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Drains histogram buffers; call periodically when nobody scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// Records one answered request.
    pub fn request_answered(&self, endpoint: &str, status: u16) {
        let status = status.to_string();
        self.counter(
            REQUESTS_TOTAL,
            &[("endpoint", endpoint), ("status", &status)],
        )
        .increment(1);
    }

    /// Records a duration sample in seconds.
    pub fn observe(&self, name: &'static str, seconds: f64) {
        self.histogram(name, &[]).record(seconds);
    }

    /// Adds to an unlabelled counter.
    pub fn add(&self, name: &'static str, n: u64) {
        self.counter(name, &[]).increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_metrics_render_with_their_constant_names() {
        let m = RouterMetrics::new().unwrap();
        m.request_answered("chat", 200);
        m.observe(TIME_TO_FIRST_TOKEN_SECONDS, 0.02);
        m.add(PROMPT_TOKENS_TOTAL, 7);
        let text = m.render();
        assert!(
            text.contains(r#"pdserve_router_requests_total{endpoint="chat",status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("pdserve_router_time_to_first_token_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("pdserve_router_prompt_tokens_total 7"),
            "{text}"
        );
    }

    #[test]
    fn two_registries_keep_separate_counts() {
        let a = RouterMetrics::new().unwrap();
        let b = RouterMetrics::new().unwrap();
        a.add(GENERATION_TOKENS_TOTAL, 3);
        assert!(
            !b.render()
                .contains("pdserve_router_generation_tokens_total 3")
        );
    }
}
