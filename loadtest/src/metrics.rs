//! From request records to the numbers users compare: [`summarize`] → [`Summary`].
//!
//! Pure: no clock, no I/O. Definitions (also in `loadtest/README.md`):
//! - latency statistics (TTFT, TPOT, ITL, E2EL, client queue) are over *successful* requests;
//!   percentiles interpolate linearly between order statistics (numpy's default), std is the
//!   population standard deviation, as in vLLM's `bench serve`;
//! - the run's duration is from the start of the run to the end of the last response; request/s,
//!   output tok/s and total tok/s divide successful requests and their tokens by it;
//! - goodput counts successful requests meeting every SLO given (a request with one output token
//!   has TPOT 0 for this purpose);
//! - peak output tok/s is the largest count of output tokens of successful requests in a 1 s
//!   bucket (chunks are placed at their arrival time); peak concurrency is the largest number of
//!   requests (all of them, failed too) in flight at once, intervals `[sent, end)`.

use crate::record::RequestRecord;
use std::collections::BTreeMap;

/// Service-level objectives for goodput, in milliseconds; `None` = not constrained.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SloSpec {
    /// TTFT bound.
    pub ttft_ms: Option<f64>,
    /// TPOT bound.
    pub tpot_ms: Option<f64>,
    /// E2EL bound.
    pub e2el_ms: Option<f64>,
}

impl SloSpec {
    /// Whether any objective is set.
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }

    /// Whether a successful request meets every objective.
    pub fn is_met_by(&self, r: &RequestRecord) -> bool {
        let ms = |s: f64| s * 1e3;
        let ok = |bound: Option<f64>, value_ms: f64| bound.is_none_or(|b| value_ms <= b);
        ok(self.ttft_ms, r.ttft_s().map_or(f64::INFINITY, ms))
            && ok(self.tpot_ms, ms(r.tpot_s().unwrap_or(0.0)))
            && ok(self.e2el_ms, ms(r.e2el_s()))
    }
}

/// Distribution summary of one latency metric, milliseconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    /// Number of samples.
    pub count: usize,
    /// Arithmetic mean (0 when empty).
    pub mean_ms: f64,
    /// 50th percentile.
    pub median_ms: f64,
    /// Population standard deviation.
    pub std_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// `(percentile, value)` for each requested percentile.
    pub percentiles_ms: Vec<(f64, f64)>,
}

/// Linear-interpolated percentile of sorted data (numpy's default method); 0 for empty data.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

impl Stats {
    /// Statistics of `values_s` (seconds), reported in milliseconds.
    pub fn from_seconds(values_s: &[f64], percentiles: &[f64]) -> Self {
        let mut v: Vec<f64> = values_s
            .iter()
            .map(|s| s * 1e3)
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Self {
                percentiles_ms: percentiles.iter().map(|&p| (p, 0.0)).collect(),
                ..Self::default()
            };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        Self {
            count: n,
            mean_ms: mean,
            median_ms: percentile(&v, 50.0),
            std_ms: var.sqrt(),
            max_ms: v[n - 1],
            percentiles_ms: percentiles
                .iter()
                .map(|&p| (p, percentile(&v, p)))
                .collect(),
        }
    }
}

/// One bucket of the run's time series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TimelinePoint {
    /// Bucket start, seconds from the start of the run.
    pub t_s: f64,
    /// Output tokens (successful requests) arriving in the bucket, per second.
    pub output_tokens_per_s: f64,
    /// Time-averaged number of requests in flight during the bucket.
    pub concurrency: f64,
    /// Requests that finished (successfully or not) in the bucket.
    pub finished: usize,
}

/// Aggregate results of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Successful requests.
    pub completed: usize,
    /// Failed requests.
    pub failed: usize,
    /// Failures counted by [`crate::record::Failure::label`].
    pub failures_by_kind: BTreeMap<String, usize>,
    /// Start of run to end of last response, seconds.
    pub duration_s: f64,
    /// Σ prompt tokens of successful requests.
    pub total_input_tokens: u64,
    /// Σ output tokens of successful requests.
    pub total_output_tokens: u64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Successful requests meeting the SLOs per second (`None` without SLOs).
    pub request_goodput: Option<f64>,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// (Input + output) tokens per second.
    pub total_token_throughput: f64,
    /// Largest 1 s bucket of output tokens.
    pub max_output_tokens_per_s: f64,
    /// Largest number of requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Time to first token.
    pub ttft: Stats,
    /// Time per output token, excluding the first.
    pub tpot: Stats,
    /// Inter-token latency, per chunk, normalized by tokens in the chunk.
    pub itl: Stats,
    /// End-to-end latency.
    pub e2el: Stats,
    /// Client-side wait between intended and actual send (open loop only).
    pub client_queue: Stats,
    /// 1 s buckets of throughput and concurrency.
    pub timeline: Vec<TimelinePoint>,
}

fn peak_concurrency(records: &[RequestRecord]) -> usize {
    let mut events: Vec<(f64, i32)> = records
        .iter()
        .flat_map(|r| [(r.sent_s, 1), (r.end_s, -1)])
        .collect();
    // Departures before arrivals at equal times: intervals are half-open.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, delta) in events {
        now += i64::from(delta);
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}

fn timeline(records: &[RequestRecord], duration_s: f64) -> Vec<TimelinePoint> {
    const BUCKET_S: f64 = 1.0;
    let buckets = ((duration_s / BUCKET_S).ceil() as usize).max(1);
    let mut points: Vec<TimelinePoint> = (0..buckets)
        .map(|i| TimelinePoint {
            t_s: i as f64 * BUCKET_S,
            output_tokens_per_s: 0.0,
            concurrency: 0.0,
            finished: 0,
        })
        .collect();
    let bucket_of = |t: f64| ((t.max(0.0) / BUCKET_S) as usize).min(buckets - 1);
    for r in records {
        if r.success() {
            for c in &r.chunks {
                points[bucket_of(c.at_s)].output_tokens_per_s += c.tokens / BUCKET_S;
            }
        }
        points[bucket_of(r.end_s)].finished += 1;
        let (start, end) = (r.sent_s.max(0.0), r.end_s.max(r.sent_s));
        for (i, p) in points
            .iter_mut()
            .enumerate()
            .take(bucket_of(end) + 1)
            .skip(bucket_of(start))
        {
            let lo = start.max(i as f64 * BUCKET_S);
            let hi = end.min((i + 1) as f64 * BUCKET_S);
            p.concurrency += (hi - lo).max(0.0) / BUCKET_S;
        }
    }
    points
}

/// Summarizes a run. `percentiles` are the extra percentiles to report (e.g. `[90, 95, 99]`).
pub fn summarize(records: &[RequestRecord], slo: &SloSpec, percentiles: &[f64]) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success()).collect();
    let mut failures_by_kind = BTreeMap::new();
    for f in records.iter().filter_map(|r| r.failure.as_ref()) {
        *failures_by_kind.entry(f.label()).or_insert(0) += 1;
    }
    let duration_s = records
        .iter()
        .map(|r| r.end_s)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let total_input_tokens: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s()).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot_s()).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itls_s()).collect();
    let e2els: Vec<f64> = ok.iter().map(|r| r.e2el_s()).collect();
    let queues: Vec<f64> = ok.iter().map(|r| r.queue_s()).collect();
    let good = ok.iter().filter(|r| slo.is_met_by(r)).count();
    let timeline = timeline(records, duration_s);
    let max_output_tokens_per_s = timeline
        .iter()
        .map(|p| p.output_tokens_per_s)
        .fold(0.0, f64::max);
    Summary {
        completed: ok.len(),
        failed: records.len() - ok.len(),
        failures_by_kind,
        duration_s,
        total_input_tokens,
        total_output_tokens,
        request_throughput: ok.len() as f64 / duration_s,
        request_goodput: slo.is_set().then(|| good as f64 / duration_s),
        output_throughput: total_output_tokens as f64 / duration_s,
        total_token_throughput: (total_input_tokens + total_output_tokens) as f64 / duration_s,
        max_output_tokens_per_s,
        max_concurrent_requests: peak_concurrency(records),
        ttft: Stats::from_seconds(&ttfts, percentiles),
        tpot: Stats::from_seconds(&tpots, percentiles),
        itl: Stats::from_seconds(&itls, percentiles),
        e2el: Stats::from_seconds(&e2els, percentiles),
        client_queue: Stats::from_seconds(&queues, percentiles),
        timeline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record_with_chunks;
    use crate::record::{Failure, FailureKind};

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn stats_use_population_std() {
        let s = Stats::from_seconds(&[0.001, 0.003], &[99.0]);
        assert_eq!(s.mean_ms, 2.0);
        assert!((s.std_ms - 1.0).abs() < 1e-9);
        assert_eq!(s.count, 2);
    }

    fn failed(at: f64) -> RequestRecord {
        let mut r = record_with_chunks(at, at, &[], at + 0.5);
        r.failure = Some(Failure {
            kind: FailureKind::Http,
            status: Some(500),
            message: "x".into(),
        });
        r
    }

    #[test]
    fn throughput_counts_successes_and_failures_are_counted_by_kind() {
        let records = vec![
            record_with_chunks(0.0, 0.0, &[0.5, 1.0, 1.5], 2.0),
            record_with_chunks(0.0, 0.0, &[0.5, 1.0, 1.5, 2.0], 4.0),
            failed(1.0),
        ];
        let s = summarize(&records, &SloSpec::default(), &[99.0]);
        assert_eq!((s.completed, s.failed), (2, 1));
        assert_eq!(s.failures_by_kind.get("http_500"), Some(&1));
        assert_eq!(s.duration_s, 4.0);
        assert_eq!(s.total_output_tokens, 7);
        assert_eq!(s.output_throughput, 7.0 / 4.0);
        assert_eq!(s.request_throughput, 0.5);
        assert_eq!(s.request_goodput, None);
        assert_eq!(s.max_concurrent_requests, 3);
        // Bucket [1, 2): tokens at 1.0, 1.5 and 1.0, 1.5 → 4.
        assert_eq!(s.max_output_tokens_per_s, 4.0);
        assert_eq!(s.timeline.len(), 4);
    }

    #[test]
    fn goodput_counts_requests_meeting_all_slos() {
        let fast = record_with_chunks(0.0, 0.0, &[0.1, 0.2], 0.2);
        let slow_first = record_with_chunks(0.0, 0.0, &[0.5, 0.6], 0.6);
        let records = vec![fast, slow_first];
        let slo = SloSpec {
            ttft_ms: Some(200.0),
            tpot_ms: Some(150.0),
            e2el_ms: None,
        };
        let s = summarize(&records, &slo, &[]);
        assert_eq!(s.request_goodput, Some(1.0 / 0.6));
    }

    #[test]
    fn concurrency_timeline_integrates_in_flight_time() {
        let records = vec![record_with_chunks(0.0, 0.5, &[1.0], 1.5)];
        let s = summarize(&records, &SloSpec::default(), &[]);
        assert_eq!(s.timeline[0].concurrency, 0.5);
        assert_eq!(s.timeline[1].concurrency, 0.5);
        assert_eq!(s.timeline[1].finished, 1);
    }

    #[test]
    fn back_to_back_requests_do_not_overlap() {
        let records = vec![
            record_with_chunks(0.0, 0.0, &[0.5], 1.0),
            record_with_chunks(1.0, 1.0, &[1.5], 2.0),
        ];
        assert_eq!(
            summarize(&records, &SloSpec::default(), &[]).max_concurrent_requests,
            1
        );
    }
}
