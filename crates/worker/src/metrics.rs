//! The services' Prometheus metrics. Names, help texts, units and buckets come from the catalog
//! ([`pdserve_protocol::metrics`], re-exported as [`catalog`]; docs/metrics.md); each service
//! records into its own registry ([`ServiceMetrics`], not a process-global recorder, so a prefill
//! and a decode instance in one process keep separate counts) rendered on its `/metrics`.
//!
//! Invariants:
//! - every series carries `instance="<instance_id>"` (a global label of the registry), so the
//!   instances of `pdserve up`, rendered together on the router's `/metrics`, stay apart;
//! - labels are bounded: `finished_reason`, `reason`, `outcome` and `link` take fixed sets,
//!   `position` is below the engine's `spec_tokens`, `expert` below 256;
//! - engine counters mirror the engine's own cumulative [`EngineStats`] (set with `absolute`), so
//!   they never drift from `/internal/stats`.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::BuildError;
use pdserve_engine::{EngineStats, FinishReason, Pacer};
use pdserve_protocol::internal::Role;
pub use pdserve_protocol::metrics as catalog;
use pdserve_protocol::metrics::{CatalogRegistry, EngineDefs, MetricDef};

use crate::backend::FabricStepReport;

/// Expert ids at or above this are not recorded (the `expert` label's bound).
pub const MAX_EXPERT_LABELS: usize = 256;

const FINISH_REASONS: [FinishReason; 4] = [
    FinishReason::Length,
    FinishReason::Stop,
    FinishReason::Abort,
    FinishReason::Error,
];

/// Why a submission was refused (the `reason` label of `requests_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Too many requests waiting.
    QueueFull,
    /// The command queue is full.
    Busy,
    /// The id is already in use.
    Duplicate,
    /// The request is invalid for this engine.
    Invalid,
    /// The engine stopped or broke.
    Unavailable,
}

impl RejectReason {
    const ALL: [RejectReason; 5] = [
        RejectReason::QueueFull,
        RejectReason::Busy,
        RejectReason::Duplicate,
        RejectReason::Invalid,
        RejectReason::Unavailable,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::Busy => "busy",
            RejectReason::Duplicate => "duplicate",
            RejectReason::Invalid => "invalid",
            RejectReason::Unavailable => "unavailable",
        }
    }
}

/// The fabric and EP metrics of one engine (the `pdserve_fabric_*` / `pdserve_ep_*` families).
#[derive(Clone)]
struct FabricMetrics {
    registry: Option<Arc<CatalogRegistry>>,
    role: &'static str,
    /// `[nvlink, ib]`.
    link_bytes: [Counter; 2],
    /// `[nvlink, ib]`.
    link_busy: [Histogram; 2],
    dispatch: Histogram,
    combine: Histogram,
    overlap: Histogram,
    balancedness: Histogram,
    /// Registered on first sight, index = expert id.
    experts: Vec<Counter>,
}

impl std::fmt::Debug for FabricMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricMetrics")
            .field("role", &self.role)
            .field("experts", &self.experts.len())
            .finish_non_exhaustive()
    }
}

impl FabricMetrics {
    fn noop() -> Self {
        Self {
            registry: None,
            role: "",
            link_bytes: std::array::from_fn(|_| Counter::noop()),
            link_busy: std::array::from_fn(|_| Histogram::noop()),
            dispatch: Histogram::noop(),
            combine: Histogram::noop(),
            overlap: Histogram::noop(),
            balancedness: Histogram::noop(),
            experts: Vec::new(),
        }
    }

    fn new(registry: &Arc<CatalogRegistry>, role: &'static str) -> Self {
        let r = registry.as_ref();
        let by_role = [("role", role)];
        let link = |link: &'static str| [("role", role), ("link", link)];
        Self {
            registry: Some(Arc::clone(registry)),
            role,
            link_bytes: ["nvlink", "ib"]
                .map(|l| r.counter(&catalog::FABRIC_LINK_BYTES_TOTAL, &link(l))),
            link_busy: ["nvlink", "ib"]
                .map(|l| r.histogram(&catalog::FABRIC_LINK_BUSY_SECONDS, &link(l))),
            dispatch: r.histogram(&catalog::FABRIC_DISPATCH_SECONDS, &by_role),
            combine: r.histogram(&catalog::FABRIC_COMBINE_SECONDS, &by_role),
            overlap: r.histogram(&catalog::FABRIC_TBO_OVERLAP_RATIO, &by_role),
            balancedness: r.histogram(&catalog::EP_BALANCEDNESS_RATIO, &by_role),
            experts: Vec::new(),
        }
    }

    fn record(&mut self, report: &FabricStepReport) {
        let bytes = [report.nvlink_bytes, report.ib_bytes];
        let busy = [report.nvlink_busy_s, report.ib_busy_s];
        for i in 0..2 {
            self.link_bytes[i].increment(bytes[i].max(0.0).round() as u64);
            self.link_busy[i].record(busy[i].max(0.0));
        }
        if let Some(s) = report.dispatch_s {
            self.dispatch.record(s);
        }
        if let Some(s) = report.combine_s {
            self.combine.record(s);
        }
        if let Some(r) = report.tbo_overlap_ratio {
            self.overlap.record(r);
        }
        if let Some(b) = report.balancedness {
            self.balancedness.record(b);
        }
        let experts = report.expert_tokens.len().min(MAX_EXPERT_LABELS);
        if let Some(registry) = &self.registry {
            while self.experts.len() < experts {
                let id = self.experts.len().to_string();
                self.experts.push(registry.counter(
                    &catalog::EP_EXPERT_TOKENS_TOTAL,
                    &[("role", self.role), ("expert", &id)],
                ));
            }
        }
        for (counter, &tokens) in self.experts.iter().zip(&report.expert_tokens) {
            counter.increment(tokens);
        }
    }
}

/// Handles of one engine's metrics; cheap to clone. [`EngineMetrics::noop`] records nothing.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    preemptions: Counter,
    steps: Counter,
    step_tokens: Histogram,
    step_simulated: Histogram,
    step_wall: Histogram,
    lag: Histogram,
    late_steps: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    queue_time: Histogram,
    finished: [Counter; 4],
    rejected: [Counter; 5],
    spec_drafts: Counter,
    spec_draft_tokens: Counter,
    spec_accepted: Counter,
    /// Index = draft position.
    spec_accepted_per_pos: Vec<Counter>,
    fabric: FabricMetrics,
}

impl EngineMetrics {
    /// Handles that record nothing (an engine outside a service).
    pub fn noop() -> Self {
        Self {
            running: Gauge::noop(),
            waiting: Gauge::noop(),
            kv_usage: Gauge::noop(),
            preemptions: Counter::noop(),
            steps: Counter::noop(),
            step_tokens: Histogram::noop(),
            step_simulated: Histogram::noop(),
            step_wall: Histogram::noop(),
            lag: Histogram::noop(),
            late_steps: Counter::noop(),
            prompt_tokens: Counter::noop(),
            generation_tokens: Counter::noop(),
            queue_time: Histogram::noop(),
            finished: std::array::from_fn(|_| Counter::noop()),
            rejected: std::array::from_fn(|_| Counter::noop()),
            spec_drafts: Counter::noop(),
            spec_draft_tokens: Counter::noop(),
            spec_accepted: Counter::noop(),
            spec_accepted_per_pos: Vec::new(),
            fabric: FabricMetrics::noop(),
        }
    }

    /// Mirrors the engine's gauges and cumulative counters and the pacer's lag.
    pub(crate) fn observe(&self, stats: &EngineStats, pacer: &Pacer) {
        self.running.set(stats.num_running as f64);
        self.waiting.set(stats.num_waiting as f64);
        self.kv_usage.set(stats.kv_usage_fraction());
        self.preemptions.absolute(stats.preemptions_total);
        self.steps.absolute(stats.steps_total);
        self.generation_tokens
            .absolute(stats.generation_tokens_total);
        for (counter, reason) in self.finished.iter().zip(FINISH_REASONS) {
            counter.absolute(stats.requests_finished_total.get(reason));
        }
        self.spec_drafts.absolute(stats.spec_drafts_total);
        self.spec_draft_tokens
            .absolute(stats.spec_draft_tokens_total);
        self.spec_accepted
            .absolute(stats.spec_accepted_tokens_total);
        for (counter, &n) in self
            .spec_accepted_per_pos
            .iter()
            .zip(&stats.spec_accepted_per_pos)
        {
            counter.absolute(n);
        }
        self.late_steps.absolute(pacer.late_steps_total());
    }

    /// One executed step: simulated and wall durations and its lag.
    pub(crate) fn record_step(&self, simulated_ns: u64, wall_ns: u64, lag_ns: u64) {
        self.step_simulated.record(simulated_ns as f64 * 1e-9);
        self.step_wall.record(wall_ns as f64 * 1e-9);
        self.lag.record(lag_ns as f64 * 1e-9);
    }

    /// One executed step's batch size and, when the clock models a fabric, what it saw.
    pub(crate) fn record_step_detail(&mut self, tokens: usize, fabric: Option<&FabricStepReport>) {
        self.step_tokens.record(tokens as f64);
        if let Some(report) = fabric {
            self.fabric.record(report);
        }
    }

    /// An accepted request's prompt.
    pub(crate) fn record_prompt(&self, tokens: usize) {
        self.prompt_tokens.increment(tokens as u64);
    }

    /// A request's first scheduling, `seconds` after submission.
    pub(crate) fn record_queue_time(&self, seconds: f64) {
        self.queue_time.record(seconds);
    }

    /// A refused submission.
    pub(crate) fn record_rejected(&self, reason: RejectReason) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == reason) {
            self.rejected[i].increment(1);
        }
    }
}

/// One service's metrics registry and its rendering.
pub struct ServiceMetrics {
    registry: Arc<CatalogRegistry>,
    role: Role,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The catalog components a service of `role` records.
fn components(role: Role) -> [&'static str; 3] {
    [role.as_str(), "fabric", "ep"]
}

impl ServiceMetrics {
    /// A fresh registry for the service `instance_id` of `role`, with the catalog's buckets and
    /// descriptions; every series gets the label `instance="<instance_id>"`.
    pub fn new(role: Role, instance_id: &str) -> Result<Self, BuildError> {
        let defs = components(role).into_iter().flat_map(catalog::of_component);
        let registry = CatalogRegistry::new(defs, Some(instance_id))?;
        Ok(Self {
            registry: Arc::new(registry),
            role,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// A cheap handle that renders this registry (for a process that serves several services'
    /// metrics on one endpoint, e.g. `pdserve up`).
    pub fn renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        self.registry.renderer()
    }

    /// Handles for this service's engine; `spec_tokens` (the scheduler's MTP depth) bounds the
    /// `position` label.
    pub fn engine(&self, spec_tokens: usize) -> EngineMetrics {
        let n = engine_defs(self.role);
        let r = self.registry.as_ref();
        let plain = |def: &MetricDef| r.counter(def, &[]);
        let decode = self.role == Role::Decode;
        let spec = |def: &MetricDef| {
            if decode {
                r.counter(def, &[])
            } else {
                Counter::noop()
            }
        };
        EngineMetrics {
            running: r.gauge(&n.num_requests_running, &[]),
            waiting: r.gauge(&n.num_requests_waiting, &[]),
            kv_usage: r.gauge(&n.kv_cache_usage_perc, &[]),
            preemptions: plain(&n.num_preemptions_total),
            steps: plain(&n.steps_total),
            step_tokens: r.histogram(&n.step_tokens, &[]),
            step_simulated: r.histogram(&n.step_simulated_seconds, &[]),
            step_wall: r.histogram(&n.step_wall_seconds, &[]),
            lag: r.histogram(&n.simulation_lag_seconds, &[]),
            late_steps: plain(&n.late_steps_total),
            prompt_tokens: plain(&n.prompt_tokens_total),
            generation_tokens: plain(&n.generation_tokens_total),
            queue_time: r.histogram(&n.request_queue_time_seconds, &[]),
            finished: FINISH_REASONS.map(|f| {
                r.counter(
                    &n.requests_finished_total,
                    &[("finished_reason", finish_label(f))],
                )
            }),
            rejected: RejectReason::ALL.map(|reason| {
                r.counter(&n.requests_rejected_total, &[("reason", reason.as_str())])
            }),
            spec_drafts: spec(&catalog::DECODE_SPEC_DECODE_NUM_DRAFTS_TOTAL),
            spec_draft_tokens: spec(&catalog::DECODE_SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL),
            spec_accepted: spec(&catalog::DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL),
            spec_accepted_per_pos: if decode {
                (0..spec_tokens)
                    .map(|p| {
                        r.counter(
                            &catalog::DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS_TOTAL,
                            &[("position", &p.to_string())],
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            fabric: FabricMetrics::new(&self.registry, self.role.as_str()),
        }
    }

    /// A counter with fixed labels (besides `instance`).
    pub(crate) fn counter(
        &self,
        def: &MetricDef,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.registry.counter(def, labels)
    }

    /// A gauge without labels (besides `instance`).
    pub(crate) fn gauge(&self, def: &MetricDef) -> Gauge {
        self.registry.gauge(def, &[])
    }

    /// A histogram without labels (besides `instance`).
    pub(crate) fn histogram(&self, def: &MetricDef) -> Histogram {
        self.registry.histogram(def, &[])
    }
}

/// The `finished_reason` label of an engine finish reason.
fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Abort => "abort",
        FinishReason::Error => "error",
    }
}

/// The engine metrics of `role`.
pub fn engine_defs(role: Role) -> EngineDefs {
    match role {
        Role::Decode => catalog::DECODE_ENGINE,
        Role::Prefill => catalog::PREFILL_ENGINE,
    }
}
