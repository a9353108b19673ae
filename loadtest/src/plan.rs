//! A validated benchmark plan ([`BenchPlan`]) and how it turns into the arrival specification of
//! each run point ([`BenchPlan::points`], [`BenchPlan::arrival_for`]).
//!
//! Invariants: a plan comes only from [`crate::args::Cli::into_plan`] (or a test building one
//! field by field) and holds no contradictory settings; a sweep yields one point per listed value,
//! in the order given, every point with the same seed (the same workload and, for a fixed rate,
//! the same gaps up to scale).

use crate::client::{ApiKind, BodyTemplate};
use crate::dataset::{DatasetSpec, Workload};
use crate::metrics::SloSpec;
use crate::schedule::{ArrivalSpec, RampStrategy, ScheduleBounds};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// A rate ramp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RampSpec {
    /// Interpolation.
    pub strategy: RampStrategy,
    /// Rate of the first request.
    pub start_per_s: f64,
    /// Rate of the last request.
    pub end_per_s: f64,
}

/// What a sweep varies.
#[derive(Debug, Clone, PartialEq)]
pub enum SweepSpec {
    /// One run per request rate (`inf` allowed).
    RequestRates(Vec<f64>),
    /// One run per concurrency cap.
    MaxConcurrency(Vec<usize>),
}

/// Where and what to write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputOptions {
    /// `--save-result`: JSON summary + per-request JSONL.
    pub save_result: bool,
    /// `--save-detailed`: per-request arrays inside the JSON summary.
    pub save_detailed: bool,
    /// `--result-dir`.
    pub result_dir: Option<PathBuf>,
    /// `--result-filename`.
    pub result_filename: Option<String>,
    /// `--label`.
    pub label: Option<String>,
    /// `--metadata` pairs.
    pub metadata: Vec<(String, String)>,
    /// `--save-csv`.
    pub save_csv: bool,
    /// `--plot`.
    pub plot: bool,
}

impl OutputOptions {
    /// Whether any file is to be written.
    pub fn writes_files(&self) -> bool {
        self.save_result || self.save_csv || self.plot
    }
}

/// Everything a benchmark needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchPlan {
    /// Server base URLs (no trailing slash).
    pub base_urls: Vec<String>,
    /// API path, starting with `/`.
    pub endpoint: String,
    /// Chat or completions.
    pub api: ApiKind,
    /// `--model`, else discovered.
    pub model: Option<String>,
    /// Extra headers (including the bearer token).
    pub headers: Vec<(String, String)>,
    /// Per-request limit, seconds.
    pub request_timeout_s: f64,
    /// Request count bound (`None`: the whole trace).
    pub num_prompts: Option<usize>,
    /// Sending window, seconds.
    pub duration_s: Option<f64>,
    /// `--request-rate` (`None` = not given: inf, or the trace's timestamps).
    pub request_rate: Option<f64>,
    /// Gamma shape.
    pub burstiness: f64,
    /// Concurrency cap.
    pub max_concurrency: Option<usize>,
    /// Rate ramp.
    pub ramp: Option<RampSpec>,
    /// Trace replay stretch.
    pub trace_slowdown: f64,
    /// Sweep, if any.
    pub sweep: Option<SweepSpec>,
    /// Seed of schedule and workload.
    pub seed: u64,
    /// Unmeasured warmup requests.
    pub num_warmups: usize,
    /// Workload.
    pub dataset: DatasetSpec,
    /// `--tokenizer`.
    pub tokenizer: Option<PathBuf>,
    /// Length control fields.
    pub ignore_eos: bool,
    /// Per-chunk usage request.
    pub continuous_usage_stats: bool,
    /// `--logprobs`.
    pub logprobs: Option<u32>,
    /// Sampling fields.
    pub sampling: Map<String, Value>,
    /// `--extra-body`.
    pub extra_body: Map<String, Value>,
    /// Goodput SLOs.
    pub slo: SloSpec,
    /// Reported percentiles.
    pub percentiles: Vec<f64>,
    /// `--time-scale`.
    pub time_scale_override: Option<f64>,
    /// Output files.
    pub output: OutputOptions,
    /// Live progress bar.
    pub progress: bool,
}

/// One run of a plan: its rate and cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Rate for this run (`None`: not given).
    pub request_rate: Option<f64>,
    /// Cap for this run.
    pub max_concurrency: Option<usize>,
}

impl BenchPlan {
    /// The runs to perform: one, or one per sweep value.
    pub fn points(&self) -> Vec<Point> {
        match &self.sweep {
            None => vec![Point {
                request_rate: self.request_rate,
                max_concurrency: self.max_concurrency,
            }],
            Some(SweepSpec::RequestRates(rates)) => rates
                .iter()
                .map(|&r| Point {
                    request_rate: Some(r),
                    max_concurrency: self.max_concurrency,
                })
                .collect(),
            Some(SweepSpec::MaxConcurrency(caps)) => caps
                .iter()
                .map(|&c| Point {
                    request_rate: self.request_rate,
                    max_concurrency: Some(c),
                })
                .collect(),
        }
    }

    /// The arrival process of a point: a ramp if set; the trace's timestamps when the workload
    /// has them and no rate was given; Gamma gaps at a finite rate; else a burst.
    pub fn arrival_for(&self, point: &Point, workload: &Workload) -> ArrivalSpec {
        if let Some(r) = self.ramp {
            return ArrivalSpec::Ramp {
                strategy: r.strategy,
                start_per_s: r.start_per_s,
                end_per_s: r.end_per_s,
                burstiness: self.burstiness,
            };
        }
        match (point.request_rate, workload.arrival_offsets_s()) {
            (None, Some(offsets_s)) => ArrivalSpec::Trace {
                offsets_s,
                slowdown: self.trace_slowdown,
            },
            (Some(rate), _) if rate.is_finite() => ArrivalSpec::Gamma {
                rate_per_s: rate,
                burstiness: self.burstiness,
            },
            _ => ArrivalSpec::Burst,
        }
    }

    /// Count and duration bounds of every point.
    pub fn bounds(&self, workload: &Workload) -> ScheduleBounds {
        ScheduleBounds {
            count: workload.len(),
            duration_s: self.duration_s,
        }
    }

    /// Full endpoint URLs, one per base URL.
    pub fn targets(&self) -> Vec<String> {
        self.base_urls
            .iter()
            .map(|b| format!("{b}{}", self.endpoint))
            .collect()
    }

    /// The request body template for `model`.
    pub fn body_template(&self, model: String) -> BodyTemplate {
        BodyTemplate {
            api: self.api,
            model,
            ignore_eos: self.ignore_eos,
            continuous_usage_stats: self.continuous_usage_stats,
            logprobs: self.logprobs,
            sampling: self.sampling.clone(),
            extra_body: self.extra_body.clone(),
        }
    }
}
