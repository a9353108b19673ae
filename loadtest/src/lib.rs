//! loadtest: a load generator for OpenAI-compatible servers, in the tradition of vLLM's
//! `bench serve`, used to measure pdserve (and any other OpenAI-compatible server).
//!
//! The pipeline, one module per concern:
//! - [`args::Cli`] (flags) → [`plan::BenchPlan`] (validated settings, one [`plan::Point`] per run);
//! - [`dataset::Workload`] (what each request asks for) and [`schedule::build_schedule`] (a pure
//!   function from seed and [`schedule::ArrivalSpec`] to intended send times);
//! - [`runner::run`] sends requests on schedule under a concurrency cap; [`client`] streams each
//!   response and [`stream::StreamAccumulator`] stamps its chunks into a
//!   [`record::RequestRecord`];
//! - [`metrics::summarize`] turns records into a [`metrics::Summary`] (pure); [`report`],
//!   [`output`], [`plot`] and [`sweep`] render it; [`bench::execute`] ties it all together.
//!
//! Latency is measured from each request's intended send time, so a stalled server shows up in
//! the latency of every request that was due during the stall (no coordinated omission).
//!
//! ```
//! use loadtest::metrics::{summarize, SloSpec};
//! use loadtest::schedule::{build_schedule, ArrivalSpec, ScheduleBounds};
//!
//! // The same seed always gives the same Poisson schedule.
//! let spec = ArrivalSpec::Gamma { rate_per_s: 4.0, burstiness: 1.0 };
//! let bounds = ScheduleBounds { count: 8, duration_s: None };
//! let schedule = build_schedule(42, &spec, &bounds).unwrap();
//! assert_eq!(schedule, build_schedule(42, &spec, &bounds).unwrap());
//!
//! // An empty run summarizes to zero throughput without panicking.
//! let summary = summarize(&[], &SloSpec::default(), &[99.0]);
//! assert_eq!(summary.completed, 0);
//! ```

pub mod args;
pub mod bench;
pub mod client;
pub mod dataset;
pub mod metrics;
pub mod output;
pub mod plan;
pub mod plot;
pub mod prompt;
pub mod record;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod sse;
pub mod stream;
pub mod sweep;
pub mod tokenizer;
