//! The one catalog of pdserve's Prometheus metrics: every name, type, unit, help text and label
//! set, as [`MetricDef`] constants listed in [`ALL`]. The router and the prefill/decode services
//! register and describe their metrics from here, docs/metrics.md is generated from here
//! ([`markdown`]), and dashboards are checked against [`ALL`].
//!
//! Conventions (DESIGN §8), checked by this module's tests:
//! - names are `pdserve_<component>_<what>_<unit>`, `component` one of [`COMPONENTS`];
//! - counters end in `_total`, gauges and histograms never do; durations end in `_seconds`,
//!   byte counts in `_bytes` (`_bytes_total` for counters), fractions in `_perc` (the vLLM name
//!   `kv_cache_usage_perc`, a fraction 0..=1) or `_ratio`;
//! - labels are bounded: every label is listed in [`LABELS`] with its value set.
//!
//! The `instance` label: every series of a prefill or decode service carries
//! `instance="<instance_id>"` (the id from its config), so the services of `pdserve up`, all
//! rendered on the router's `/metrics`, stay apart, and the router's per-instance series use the
//! same values. Scrape with `honor_labels: true` to keep it as `instance` (otherwise Prometheus
//! renames it `exported_instance` and puts the scrape target in `instance`).
//!
//! ```
//! use pdserve_protocol::metrics::{self, MetricKind};
//!
//! let ttft = metrics::ROUTER_TIME_TO_FIRST_TOKEN_SECONDS;
//! assert_eq!(ttft.name, "pdserve_router_time_to_first_token_seconds");
//! assert_eq!(ttft.kind, MetricKind::Histogram);
//! assert!(metrics::ALL.iter().any(|m| m.name == ttft.name));
//! assert_eq!(metrics::find("pdserve_decode_num_requests_running").map(|m| m.kind),
//!            Some(MetricKind::Gauge));
//! ```

use std::fmt::Write as _;

/// A metric's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, `_sum` and `_count`.
    Histogram,
}

impl MetricKind {
    /// The Prometheus type name.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric of the catalog.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricDef {
    /// Full Prometheus name.
    pub name: &'static str,
    /// Prometheus type.
    pub kind: MetricKind,
    /// Unit of a sample (`seconds`, `bytes`, `tokens`, `requests`, `ratio`, …).
    pub unit: &'static str,
    /// Help text (the `# HELP` line).
    pub help: &'static str,
    /// Label names, each listed in [`LABELS`].
    pub labels: &'static [&'static str],
    /// Histogram bucket upper bounds (empty for counters and gauges).
    pub buckets: &'static [f64],
}

impl MetricDef {
    /// The component: the word after `pdserve_` (`router`, `prefill`, `decode`, `fabric`, `ep`).
    pub fn component(&self) -> &'static str {
        let rest = self.name.strip_prefix("pdserve_").unwrap_or(self.name);
        rest.split('_').next().unwrap_or(rest)
    }
}

/// A label and its bounded value set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelDef {
    /// Label name.
    pub name: &'static str,
    /// The values it takes, in words.
    pub values: &'static str,
}

/// Components, in documentation order.
pub const COMPONENTS: &[&str] = &["router", "prefill", "decode", "fabric", "ep"];

/// Every label used by the catalog.
pub const LABELS: &[LabelDef] = &[
    LabelDef {
        name: "endpoint",
        values: "`chat_completions`, `completions`, `models`, `health`, `metrics`, `other` (fixed by the router's routes)",
    },
    LabelDef {
        name: "status",
        values: "HTTP status code of the answer (`200`, `400`, `429`, `503`, …: the codes the router emits)",
    },
    LabelDef {
        name: "role",
        values: "`prefill`, `decode`",
    },
    LabelDef {
        name: "instance",
        values: "instance ids from the cluster config (`[prefill.<id>]`, `[decode.<id>]`; `pdserve up`: \
                 `prefill-0`, `decode-0`); see the module docs for scraping",
    },
    LabelDef {
        name: "policy",
        values: "`round_robin`, `least_load`, `power_of_two`, `cache_aware`",
    },
    LabelDef {
        name: "reason",
        values: "per metric, a fixed set named in its help",
    },
    LabelDef {
        name: "stage",
        values: "`first_token`, `inter_token`, `total`, `kv_transfer` (router stage timeouts)",
    },
    LabelDef {
        name: "finished_reason",
        values: "`stop`, `length`, `abort`, `error`",
    },
    LabelDef {
        name: "outcome",
        values: "`accepted`, `invalid`, `unwanted`, `overloaded`, `failed` (KV frames at decode)",
    },
    LabelDef {
        name: "position",
        values: "draft position `0`..`spec_tokens - 1` (0-based; bounded by the MTP depth, 1 for DeepSeek-V3)",
    },
    LabelDef {
        name: "link",
        values: "`nvlink` (scale-up), `ib` (scale-out NICs)",
    },
    LabelDef {
        name: "expert",
        values: "routed expert id `0`..`n_routed_experts - 1` of the real model executed; ids ≥ 256 are \
                 not recorded (DeepSeek-V3 has 256), so at most 256 series per instance",
    },
];

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
const STEP_BUCKETS_S: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
const LAG_BUCKETS_S: &[f64] = &[0.0, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];
const COLLECTIVE_BUCKETS_S: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];
const RATIO_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];

const fn counter(
    name: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: MetricKind::Counter,
        unit,
        help,
        labels,
        buckets: &[],
    }
}

const fn gauge(
    name: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: MetricKind::Gauge,
        unit,
        help,
        labels,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: MetricKind::Histogram,
        unit,
        help,
        labels,
        buckets,
    }
}

// ---------------------------------------------------------------------------------------------
// Router (`pdserve_router_*`): the router process; no `instance` label on its own series.

/// Requests answered, by endpoint and HTTP status.
pub const ROUTER_REQUESTS_TOTAL: MetricDef = counter(
    "pdserve_router_requests_total",
    "requests",
    &["endpoint", "status"],
    "Requests answered, by endpoint and HTTP status.",
);
/// Requests in flight at the router.
pub const ROUTER_NUM_REQUESTS_RUNNING: MetricDef = gauge(
    "pdserve_router_num_requests_running",
    "requests",
    &[],
    "Requests in flight at the router.",
);
/// Generations finished, by finish reason.
pub const ROUTER_REQUESTS_FINISHED_TOTAL: MetricDef = counter(
    "pdserve_router_requests_finished_total",
    "requests",
    &["finished_reason"],
    "Generations (choices) finished, by finish reason: stop, length, abort (client gone or \
     cancelled), error.",
);
/// Arrival to first token.
pub const ROUTER_TIME_TO_FIRST_TOKEN_SECONDS: MetricDef = histogram(
    "pdserve_router_time_to_first_token_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "Request arrival at the router to the first token of a generation (wall).",
);
/// Gap between tokens.
pub const ROUTER_INTER_TOKEN_LATENCY_SECONDS: MetricDef = histogram(
    "pdserve_router_inter_token_latency_seconds",
    "seconds",
    &[],
    ITL_BUCKETS_S,
    "Gap between consecutive decode events of a generation divided over the tokens of the later \
     event (wall).",
);
/// Arrival to end of generation.
pub const ROUTER_E2E_REQUEST_LATENCY_SECONDS: MetricDef = histogram(
    "pdserve_router_e2e_request_latency_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "Request arrival at the router to the end of a generation (wall).",
);
/// Time queued at prefill.
pub const ROUTER_REQUEST_QUEUE_TIME_SECONDS: MetricDef = histogram(
    "pdserve_router_request_queue_time_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "Time a request waited in the prefill engine's queue (reported by the prefill instance).",
);
/// Prefill compute.
pub const ROUTER_REQUEST_PREFILL_TIME_SECONDS: MetricDef = histogram(
    "pdserve_router_request_prefill_time_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "First prefill step to the release of the last (wall, paced; reported by the prefill instance).",
);
/// KV transfer prefill → decode.
pub const ROUTER_KV_TRANSFER_TIME_SECONDS: MetricDef = histogram(
    "pdserve_router_kv_transfer_time_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "KV transfer from prefill to decode, start to last byte (reported by the prefill instance).",
);
/// First token to last token.
pub const ROUTER_REQUEST_DECODE_TIME_SECONDS: MetricDef = histogram(
    "pdserve_router_request_decode_time_seconds",
    "seconds",
    &[],
    LATENCY_BUCKETS_S,
    "First token to the last token of a generation (wall).",
);
/// Router work before dispatch.
pub const ROUTER_OVERHEAD_SECONDS: MetricDef = histogram(
    "pdserve_router_overhead_seconds",
    "seconds",
    &[],
    OVERHEAD_BUCKETS_S,
    "Router work before the request is dispatched: parse, validate, tokenize, select instances.",
);
/// Prompt tokens.
pub const ROUTER_PROMPT_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_router_prompt_tokens_total",
    "tokens",
    &[],
    "Prompt tokens of answered requests (each prompt once, whatever `n`).",
);
/// Generated tokens.
pub const ROUTER_GENERATION_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_router_generation_tokens_total",
    "tokens",
    &[],
    "Generated tokens of answered requests, over all choices.",
);
/// Prefix-cache hits.
pub const ROUTER_CACHED_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_router_cached_tokens_total",
    "tokens",
    &[],
    "Prompt tokens served from prefill prefix caches.",
);
/// Routing decisions.
pub const ROUTER_ROUTING_DECISIONS_TOTAL: MetricDef = counter(
    "pdserve_router_routing_decisions_total",
    "decisions",
    &["role", "instance", "policy"],
    "Instances chosen by the routing policy, by role, instance and policy.",
);
/// The configured policies.
pub const ROUTER_POLICY_INFO: MetricDef = gauge(
    "pdserve_router_policy_info",
    "info",
    &["role", "policy"],
    "Always 1: the routing policy configured for each role.",
);
/// Retries.
pub const ROUTER_RETRIES_TOTAL: MetricDef = counter(
    "pdserve_router_retries_total",
    "retries",
    &["role", "reason"],
    "Legs retried on another instance (prefill: before decode committed; decode: opening the \
     stream), by role and reason: connect, timeout, status_5xx, status_4xx, protocol; and, for \
     prefill, kv_invalid, kv_timeout (decode reported the KV push failed before its first token: \
     the pair is retried with a fresh decode registration).",
);
/// Aborts sent.
pub const ROUTER_ABORTS_TOTAL: MetricDef = counter(
    "pdserve_router_aborts_total",
    "requests",
    &["role", "reason"],
    "Abort calls sent to instances, by role and reason: client_disconnect, retry, stop_string, failure.",
);
/// Stage timeouts.
pub const ROUTER_STAGE_TIMEOUTS_TOTAL: MetricDef = counter(
    "pdserve_router_stage_timeouts_total",
    "timeouts",
    &["stage"],
    "Stage timeouts, by stage.",
);
/// Failed generations.
pub const ROUTER_GENERATION_FAILURES_TOTAL: MetricDef = counter(
    "pdserve_router_generation_failures_total",
    "generations",
    &["reason"],
    "Failed generations, by reason: no_instance, timeout, connect, status_5xx, status_4xx, protocol, \
     kv_timeout, kv_invalid, overloaded, aborted, decode_error, kv_layout_mismatch (no prefill/decode \
     pair with equal KV layer counts).",
);
/// Instance health.
pub const ROUTER_INSTANCE_HEALTHY: MetricDef = gauge(
    "pdserve_router_instance_healthy",
    "boolean",
    &["role", "instance"],
    "1 when the instance is eligible for routing, else 0.",
);
/// Requests in flight per instance.
pub const ROUTER_INSTANCE_INFLIGHT_REQUESTS: MetricDef = gauge(
    "pdserve_router_instance_inflight_requests",
    "requests",
    &["role", "instance"],
    "Requests this router has in flight on the instance.",
);
/// KV usage an instance reported.
pub const ROUTER_INSTANCE_KV_CACHE_USAGE_PERC: MetricDef = gauge(
    "pdserve_router_instance_kv_cache_usage_perc",
    "ratio",
    &["role", "instance"],
    "Fraction of KV blocks in use (0..1) the instance last reported to the router's health poll.",
);

mod engine;
#[cfg(feature = "prometheus")]
mod registry;
pub use engine::*;
#[cfg(feature = "prometheus")]
pub use registry::CatalogRegistry;

// ---------------------------------------------------------------------------------------------
// Prefill only.

/// Per-request prefill time.
pub const PREFILL_REQUEST_PREFILL_TIME_SECONDS: MetricDef = histogram(
    "pdserve_prefill_request_prefill_time_seconds",
    "seconds",
    &["instance"],
    LATENCY_BUCKETS_S,
    "Per request, its first scheduled prefill step to the release of its last prefill step (wall, \
     paced by time_scale).",
);
/// KV push, wall.
pub const PREFILL_KV_TRANSFER_SECONDS: MetricDef = histogram(
    "pdserve_prefill_kv_transfer_seconds",
    "seconds",
    &["instance"],
    LATENCY_BUCKETS_S,
    "KV push to a decode instance, start to last byte written (wall, paced).",
);
/// KV push, simulated.
pub const PREFILL_KV_TRANSFER_SIMULATED_SECONDS: MetricDef = histogram(
    "pdserve_prefill_kv_transfer_simulated_seconds",
    "seconds",
    &["instance"],
    LATENCY_BUCKETS_S,
    "Simulated KV transfer time on the modeled fabric (before time_scale).",
);
/// KV bytes pushed.
pub const PREFILL_KV_TRANSFER_BYTES_TOTAL: MetricDef = counter(
    "pdserve_prefill_kv_transfer_bytes_total",
    "bytes",
    &["instance"],
    "Bytes of KV frames acknowledged by decode instances.",
);
/// KV transfer failures.
pub const PREFILL_KV_TRANSFER_FAILURES_TOTAL: MetricDef = counter(
    "pdserve_prefill_kv_transfer_failures_total",
    "transfers",
    &["instance", "reason"],
    "Failed KV transfers, by reason: connect, timeout, io, rejected, aborted, export.",
);
/// KV transfer lag.
pub const PREFILL_KV_TRANSFER_LAG_SECONDS: MetricDef = histogram(
    "pdserve_prefill_kv_transfer_lag_seconds",
    "seconds",
    &["instance"],
    LAG_BUCKETS_S,
    "Per KV transfer, how much later than the simulated transfer time × time_scale the last byte \
     was written (0 when on time).",
);

// ---------------------------------------------------------------------------------------------
// Decode only.

/// MTP drafts verified.
pub const DECODE_SPEC_DECODE_NUM_DRAFTS_TOTAL: MetricDef = counter(
    "pdserve_decode_spec_decode_num_drafts_total",
    "drafts",
    &["instance"],
    "Decode steps of a request that verified an MTP draft (the denominator of per-position \
     acceptance).",
);
/// MTP draft tokens verified.
pub const DECODE_SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_decode_spec_decode_num_draft_tokens_total",
    "tokens",
    &["instance"],
    "MTP draft tokens verified.",
);
/// MTP draft tokens accepted.
pub const DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_decode_spec_decode_num_accepted_tokens_total",
    "tokens",
    &["instance"],
    "MTP draft tokens accepted.",
);
/// Accepted per position.
pub const DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS_TOTAL: MetricDef = counter(
    "pdserve_decode_spec_decode_num_accepted_tokens_per_pos_total",
    "tokens",
    &["instance", "position"],
    "MTP draft tokens accepted at each draft position; acceptance at position p is this over \
     spec_decode_num_drafts_total.",
);
/// KV frames received.
pub const DECODE_KV_FRAMES_TOTAL: MetricDef = counter(
    "pdserve_decode_kv_frames_total",
    "frames",
    &["instance", "outcome"],
    "KV frames received, by outcome (failed: a transfer that broke off, truncated or idle).",
);
/// KV bytes received.
pub const DECODE_KV_RECEIVED_BYTES_TOTAL: MetricDef = counter(
    "pdserve_decode_kv_received_bytes_total",
    "bytes",
    &["instance"],
    "Bytes of accepted KV frames.",
);
/// Registration to KV paired.
pub const DECODE_KV_WAIT_SECONDS: MetricDef = histogram(
    "pdserve_decode_kv_wait_seconds",
    "seconds",
    &["instance"],
    LATENCY_BUCKETS_S,
    "Registration of a decode request to its KV frame paired with it (0 when the frame came first).",
);
/// KV timeouts.
pub const DECODE_KV_TIMEOUTS_TOTAL: MetricDef = counter(
    "pdserve_decode_kv_timeouts_total",
    "requests",
    &["instance"],
    "Decode requests failed with kv_timeout.",
);
/// Orphan frames.
pub const DECODE_KV_ORPHANS_EXPIRED_TOTAL: MetricDef = counter(
    "pdserve_decode_kv_orphans_expired_total",
    "frames",
    &["instance"],
    "KV frames dropped because no decode request claimed them in time.",
);
/// Requests waiting for KV.
pub const DECODE_KV_WAITING_REQUESTS: MetricDef = gauge(
    "pdserve_decode_kv_waiting_requests",
    "requests",
    &["instance"],
    "Decode requests registered and waiting for their KV.",
);
/// Frames waiting for their request.
pub const DECODE_KV_STAGED_FRAMES: MetricDef = gauge(
    "pdserve_decode_kv_staged_frames",
    "frames",
    &["instance"],
    "KV frames held until their decode request arrives.",
);

// ---------------------------------------------------------------------------------------------
// Fabric and EP (`pdserve_fabric_*`, `pdserve_ep_*`): per instance, from the fabric clock's
// priced step (simulated time), recorded by prefill and decode alike.

/// Link bytes.
pub const FABRIC_LINK_BYTES_TOTAL: MetricDef = counter(
    "pdserve_fabric_link_bytes_total",
    "bytes",
    &["instance", "role", "link"],
    "Bytes the step's dispatch and combine collectives moved over each link class, summed over \
     the EP group (simulated).",
);
/// Link busy time.
pub const FABRIC_LINK_BUSY_SECONDS: MetricDef = histogram(
    "pdserve_fabric_link_busy_seconds",
    "seconds",
    &["instance", "role", "link"],
    STEP_BUCKETS_S,
    "Per priced step, the simulated busy time of each link class: the step's bytes on that class \
     over the EP group's aggregate effective bandwidth of the class (GPUs × the profile's per-GPU \
     effective bytes/s), i.e. the mean per-GPU time at line rate. Utilization = \
     rate(_sum) / rate(step_simulated_seconds_sum).",
);
/// Dispatch time.
pub const FABRIC_DISPATCH_SECONDS: MetricDef = histogram(
    "pdserve_fabric_dispatch_seconds",
    "seconds",
    &["instance", "role"],
    COLLECTIVE_BUCKETS_S,
    "Per priced step, the mean span (first issue to last arrival) of its MoE dispatch collectives \
     (simulated).",
);
/// Combine time.
pub const FABRIC_COMBINE_SECONDS: MetricDef = histogram(
    "pdserve_fabric_combine_seconds",
    "seconds",
    &["instance", "role"],
    COLLECTIVE_BUCKETS_S,
    "Per priced step, the mean span (first issue to last arrival) of its MoE combine collectives \
     (simulated).",
);
/// Overlap ratio.
pub const FABRIC_TBO_OVERLAP_RATIO: MetricDef = histogram(
    "pdserve_fabric_tbo_overlap_ratio",
    "ratio",
    &["instance", "role"],
    RATIO_BUCKETS,
    "Per two-batch-overlap step, the fraction of communication time hidden under compute: \
     (compute + comm − duration) / comm clamped to 0..1, where comm is the union of the step's \
     dispatch/combine spans, compute the mean per-GPU compute-stream busy time, duration the \
     step's simulated time. Single-batch steps are not recorded.",
);
/// Tokens per expert.
pub const EP_EXPERT_TOKENS_TOTAL: MetricDef = counter(
    "pdserve_ep_expert_tokens_total",
    "tokens",
    &["instance", "role", "expert"],
    "Token-to-expert assignments of the real model's routing per routed expert, summed over its \
     MoE layers (the MTP layer included). Bounded: expert < 256.",
);
/// Balancedness.
pub const EP_BALANCEDNESS_RATIO: MetricDef = histogram(
    "pdserve_ep_balancedness_ratio",
    "ratio",
    &["instance", "role"],
    RATIO_BUCKETS,
    "Per priced step, EPLB balancedness: for each real MoE layer, mean over the EP group's GPUs of \
     the token-expert assignments each GPU computes (a redundant expert's share split evenly over \
     its copies) divided by the max, averaged over layers; 1 is perfect balance.",
);

/// Every metric of the catalog.
pub const ALL: &[MetricDef] = &[
    ROUTER_REQUESTS_TOTAL,
    ROUTER_NUM_REQUESTS_RUNNING,
    ROUTER_REQUESTS_FINISHED_TOTAL,
    ROUTER_TIME_TO_FIRST_TOKEN_SECONDS,
    ROUTER_INTER_TOKEN_LATENCY_SECONDS,
    ROUTER_E2E_REQUEST_LATENCY_SECONDS,
    ROUTER_REQUEST_QUEUE_TIME_SECONDS,
    ROUTER_REQUEST_PREFILL_TIME_SECONDS,
    ROUTER_KV_TRANSFER_TIME_SECONDS,
    ROUTER_REQUEST_DECODE_TIME_SECONDS,
    ROUTER_OVERHEAD_SECONDS,
    ROUTER_PROMPT_TOKENS_TOTAL,
    ROUTER_GENERATION_TOKENS_TOTAL,
    ROUTER_CACHED_TOKENS_TOTAL,
    ROUTER_ROUTING_DECISIONS_TOTAL,
    ROUTER_POLICY_INFO,
    ROUTER_RETRIES_TOTAL,
    ROUTER_ABORTS_TOTAL,
    ROUTER_STAGE_TIMEOUTS_TOTAL,
    ROUTER_GENERATION_FAILURES_TOTAL,
    ROUTER_INSTANCE_HEALTHY,
    ROUTER_INSTANCE_INFLIGHT_REQUESTS,
    ROUTER_INSTANCE_KV_CACHE_USAGE_PERC,
    PREFILL_NUM_REQUESTS_RUNNING,
    PREFILL_NUM_REQUESTS_WAITING,
    PREFILL_KV_CACHE_USAGE_PERC,
    PREFILL_NUM_PREEMPTIONS_TOTAL,
    PREFILL_STEPS_TOTAL,
    PREFILL_STEP_TOKENS,
    PREFILL_STEP_SIMULATED_SECONDS,
    PREFILL_STEP_WALL_SECONDS,
    PREFILL_SIMULATION_LAG_SECONDS,
    PREFILL_LATE_STEPS_TOTAL,
    PREFILL_PROMPT_TOKENS_TOTAL,
    PREFILL_GENERATION_TOKENS_TOTAL,
    PREFILL_REQUEST_QUEUE_TIME_SECONDS,
    PREFILL_REQUESTS_FINISHED_TOTAL,
    PREFILL_REQUESTS_REJECTED_TOTAL,
    PREFILL_REQUEST_PREFILL_TIME_SECONDS,
    PREFILL_KV_TRANSFER_SECONDS,
    PREFILL_KV_TRANSFER_SIMULATED_SECONDS,
    PREFILL_KV_TRANSFER_BYTES_TOTAL,
    PREFILL_KV_TRANSFER_FAILURES_TOTAL,
    PREFILL_KV_TRANSFER_LAG_SECONDS,
    DECODE_NUM_REQUESTS_RUNNING,
    DECODE_NUM_REQUESTS_WAITING,
    DECODE_KV_CACHE_USAGE_PERC,
    DECODE_NUM_PREEMPTIONS_TOTAL,
    DECODE_STEPS_TOTAL,
    DECODE_STEP_TOKENS,
    DECODE_STEP_SIMULATED_SECONDS,
    DECODE_STEP_WALL_SECONDS,
    DECODE_SIMULATION_LAG_SECONDS,
    DECODE_LATE_STEPS_TOTAL,
    DECODE_PROMPT_TOKENS_TOTAL,
    DECODE_GENERATION_TOKENS_TOTAL,
    DECODE_REQUEST_QUEUE_TIME_SECONDS,
    DECODE_REQUESTS_FINISHED_TOTAL,
    DECODE_REQUESTS_REJECTED_TOTAL,
    DECODE_SPEC_DECODE_NUM_DRAFTS_TOTAL,
    DECODE_SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL,
    DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL,
    DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS_TOTAL,
    DECODE_KV_FRAMES_TOTAL,
    DECODE_KV_RECEIVED_BYTES_TOTAL,
    DECODE_KV_WAIT_SECONDS,
    DECODE_KV_TIMEOUTS_TOTAL,
    DECODE_KV_ORPHANS_EXPIRED_TOTAL,
    DECODE_KV_WAITING_REQUESTS,
    DECODE_KV_STAGED_FRAMES,
    FABRIC_LINK_BYTES_TOTAL,
    FABRIC_LINK_BUSY_SECONDS,
    FABRIC_DISPATCH_SECONDS,
    FABRIC_COMBINE_SECONDS,
    FABRIC_TBO_OVERLAP_RATIO,
    EP_EXPERT_TOKENS_TOTAL,
    EP_BALANCEDNESS_RATIO,
];

/// The catalog entry named `name` (a histogram's `_bucket`/`_sum`/`_count` series included).
pub fn find(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().find(|m| m.name == name).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            ALL.iter()
                .find(|m| m.name == base && m.kind == MetricKind::Histogram)
        })
    })
}

/// The metrics of `component`, in catalog order.
pub fn of_component(component: &str) -> impl Iterator<Item = &'static MetricDef> + '_ {
    ALL.iter().filter(move |m| m.component() == component)
}

/// docs/metrics.md: the label table and one table per component, generated from the catalog.
pub fn markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "# Metrics\n\n\
         <!-- Generated from crates/protocol/src/metrics.rs by `pdserve_protocol::metrics::markdown`; \
         do not edit. Regenerate: PDSERVE_BLESS=1 cargo test -p pdserve-protocol --test metrics_doc -->\n\n\
         Every pdserve service serves Prometheus text on `GET /metrics`. `pdserve up` is one scrape \
         target: the router's `/metrics` renders the router's metrics followed by those of its \
         in-process prefill and decode instances. Services started separately \
         (config/cluster-local.toml) each serve their own.\n\n\
         Names are `pdserve_<component>_<what>_<unit>`; counters end in `_total`, durations in \
         `_seconds`. Every series of a prefill or decode instance carries `instance=\"<instance_id>\"`; \
         scrape with `honor_labels: true` to keep that label as `instance` (otherwise Prometheus \
         renames it `exported_instance`). Simulated times are on the modeled cluster (before \
         `time_scale`); wall times are the host's.\n\n\
         ## Labels\n\n| Label | Values |\n|---|---|\n",
    );
    for l in LABELS {
        let _ = writeln!(out, "| `{}` | {} |", l.name, l.values);
    }
    for component in COMPONENTS {
        let _ = write!(
            out,
            "\n## {component}\n\n| Name | Type | Unit | Labels | Help |\n|---|---|---|---|---|\n"
        );
        for m in of_component(component) {
            let labels = m
                .labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                m.name,
                m.kind.as_str(),
                m.unit,
                labels,
                m.help.replace('|', "\\|")
            );
        }
    }
    out
}
