//! Rendering results: the JSON summary ([`summary_json`], keys as in vLLM's `bench serve` result
//! file where the meaning is the same) and the terminal table ([`render_table`]).
//!
//! Invariants: every number printed in the table is also in the JSON under a documented key;
//! simulated-time figures appear only when a positive time scale is known, always next to the
//! scale they were converted with.

use crate::metrics::{Stats, Summary};
use crate::record::RequestRecord;
use serde_json::{Map, Value, json};
use std::fmt::Write as _;

/// Run facts that are not measurements, for the summary header.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFacts {
    /// `YYYYMMDD-HHMMSS` (UTC).
    pub date: String,
    /// `openai` or `openai-chat`.
    pub backend: String,
    /// `--label`, else the backend.
    pub label: String,
    /// Model requested.
    pub model_id: String,
    /// `--tokenizer` path, if any.
    pub tokenizer_id: Option<String>,
    /// Requests in the run.
    pub num_prompts: usize,
    /// Rate (`None` = inf / trace / ramp).
    pub request_rate: Option<f64>,
    /// Gamma shape.
    pub burstiness: f64,
    /// Cap.
    pub max_concurrency: Option<usize>,
    /// `burst`, `gamma`, `ramp-linear`, `ramp-exponential`, or `trace`.
    pub arrival: String,
    /// Seed.
    pub seed: u64,
    /// `--dataset-name`.
    pub dataset_name: String,
    /// Target base URLs.
    pub base_urls: Vec<String>,
    /// Whether latency is measured from intended send times.
    pub open_loop: bool,
    /// Wall seconds per simulated second, when known.
    pub time_scale: Option<f64>,
    /// Simulated hardware reported by the server.
    pub hardware: Option<String>,
    /// Modeled model reported by the server.
    pub modeled_model: Option<String>,
    /// Fabric mode reported by the server.
    pub sim_mode: Option<String>,
    /// Requests not sent because the duration ended while they waited for a slot.
    pub unsent: usize,
    /// Failed warmup requests.
    pub warmup_failures: usize,
    /// SLOs, ms, by metric name.
    pub slo_ms: Map<String, Value>,
    /// `--metadata` pairs.
    pub metadata: Vec<(String, String)>,
}

/// `99` → `"99"`, `99.9` → `"99.9"` (vLLM's key spelling).
pub fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

fn put_stats(m: &mut Map<String, Value>, name: &str, s: &Stats) {
    m.insert(format!("mean_{name}_ms"), json!(s.mean_ms));
    m.insert(format!("median_{name}_ms"), json!(s.median_ms));
    m.insert(format!("std_{name}_ms"), json!(s.std_ms));
    for (p, v) in &s.percentiles_ms {
        m.insert(format!("p{}_{name}_ms", percentile_word(*p)), json!(v));
    }
    m.insert(format!("max_{name}_ms"), json!(s.max_ms));
}

/// The measurement keys of a summary (shared by the wall-clock and the simulated block).
pub fn metrics_map(s: &Summary) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("duration".into(), json!(s.duration_s));
    m.insert("completed".into(), json!(s.completed));
    m.insert("failed".into(), json!(s.failed));
    m.insert("failures_by_kind".into(), json!(s.failures_by_kind));
    m.insert("total_input_tokens".into(), json!(s.total_input_tokens));
    m.insert("total_output_tokens".into(), json!(s.total_output_tokens));
    m.insert("request_throughput".into(), json!(s.request_throughput));
    m.insert("request_goodput".into(), json!(s.request_goodput));
    m.insert("output_throughput".into(), json!(s.output_throughput));
    m.insert(
        "total_token_throughput".into(),
        json!(s.total_token_throughput),
    );
    m.insert(
        "max_output_tokens_per_s".into(),
        json!(s.max_output_tokens_per_s),
    );
    m.insert(
        "max_concurrent_requests".into(),
        json!(s.max_concurrent_requests),
    );
    put_stats(&mut m, "ttft", &s.ttft);
    put_stats(&mut m, "tpot", &s.tpot);
    put_stats(&mut m, "itl", &s.itl);
    put_stats(&mut m, "e2el", &s.e2el);
    put_stats(&mut m, "client_queue_time", &s.client_queue);
    m.insert("timeline".into(), json!(s.timeline));
    m
}

/// The per-request arrays vLLM writes with `--save-detailed` (seconds, as vLLM).
fn detailed_arrays(records: &[RequestRecord]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "input_lens".into(),
        json!(records.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>()),
    );
    m.insert(
        "output_lens".into(),
        json!(
            records
                .iter()
                .map(|r| if r.success() { r.output_tokens } else { 0 })
                .collect::<Vec<_>>()
        ),
    );
    m.insert(
        "ttfts".into(),
        json!(
            records
                .iter()
                .map(|r| r.ttft_s().unwrap_or(0.0))
                .collect::<Vec<_>>()
        ),
    );
    m.insert(
        "itls".into(),
        json!(
            records
                .iter()
                .map(RequestRecord::itls_s)
                .collect::<Vec<_>>()
        ),
    );
    m.insert(
        "latencies".into(),
        json!(
            records
                .iter()
                .map(RequestRecord::e2el_s)
                .collect::<Vec<_>>()
        ),
    );
    m.insert(
        "start_times".into(),
        json!(records.iter().map(|r| r.sent_s).collect::<Vec<_>>()),
    );
    m.insert(
        "intended_times".into(),
        json!(records.iter().map(|r| r.intended_s).collect::<Vec<_>>()),
    );
    m.insert(
        "errors".into(),
        json!(
            records
                .iter()
                .map(|r| r
                    .failure
                    .as_ref()
                    .map_or(String::new(), |f| f.message.clone()))
                .collect::<Vec<_>>()
        ),
    );
    m
}

/// The JSON summary of one run.
pub fn summary_json(
    facts: &RunFacts,
    wall: &Summary,
    simulated: Option<&Summary>,
    records: &[RequestRecord],
    detailed: bool,
) -> Value {
    let mut m = Map::new();
    m.insert("date".into(), json!(facts.date));
    m.insert("endpoint_type".into(), json!(facts.backend));
    m.insert("backend".into(), json!(facts.backend));
    m.insert("label".into(), json!(facts.label));
    m.insert("model_id".into(), json!(facts.model_id));
    m.insert("tokenizer_id".into(), json!(facts.tokenizer_id));
    m.insert("num_prompts".into(), json!(facts.num_prompts));
    for (k, v) in &facts.metadata {
        m.insert(k.clone(), json!(v));
    }
    m.insert(
        "request_rate".into(),
        facts
            .request_rate
            .filter(|r| r.is_finite())
            .map_or(json!("inf"), |r| json!(r)),
    );
    m.insert("burstiness".into(), json!(facts.burstiness));
    m.insert("max_concurrency".into(), json!(facts.max_concurrency));
    m.insert("arrival".into(), json!(facts.arrival));
    m.insert("seed".into(), json!(facts.seed));
    m.insert("dataset_name".into(), json!(facts.dataset_name));
    m.insert("base_urls".into(), json!(facts.base_urls));
    m.insert(
        "latency_origin".into(),
        json!(if facts.open_loop { "intended" } else { "sent" }),
    );
    m.insert("unsent".into(), json!(facts.unsent));
    m.insert("warmup_failures".into(), json!(facts.warmup_failures));
    m.insert("goodput_slo_ms".into(), Value::Object(facts.slo_ms.clone()));
    let usage_reported = records
        .iter()
        .filter(|r| r.success())
        .all(|r| r.usage_reported);
    m.insert("token_counts_from_usage".into(), json!(usage_reported));
    let mut sources: Vec<_> = records
        .iter()
        .filter(|r| r.success())
        .map(|r| r.chunk_token_source)
        .collect();
    sources.sort();
    sources.dedup();
    m.insert("itl_token_source".into(), json!(sources));
    m.extend(metrics_map(wall));
    m.insert("time_scale".into(), json!(facts.time_scale));
    m.insert("hardware".into(), json!(facts.hardware));
    m.insert("modeled_model".into(), json!(facts.modeled_model));
    m.insert("sim_mode".into(), json!(facts.sim_mode));
    let sim = simulated.map(|s| {
        let mut sm = metrics_map(s);
        sm.insert("time_scale".into(), json!(facts.time_scale));
        Value::Object(sm)
    });
    m.insert("simulated".into(), sim.unwrap_or(Value::Null));
    if detailed {
        m.extend(detailed_arrays(records));
    }
    Value::Object(m)
}

struct Table {
    out: String,
    two_columns: bool,
}

impl Table {
    fn heading(&mut self, title: &str, fill: char) {
        let pad = 60usize.saturating_sub(title.chars().count() + 2);
        let left: String = std::iter::repeat_n(fill, pad / 2).collect();
        let right: String = std::iter::repeat_n(fill, pad - pad / 2).collect();
        let _ = writeln!(self.out, "{left} {title} {right}");
    }

    fn row(&mut self, label: &str, wall: String, sim: Option<String>) {
        match (self.two_columns, sim) {
            (true, Some(s)) => {
                let _ = writeln!(self.out, "{label:<38} {wall:>10} {s:>10}");
            }
            _ => {
                let _ = writeln!(self.out, "{label:<38} {wall:>10}");
            }
        }
    }
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// The terminal summary of one run, in the layout of vLLM's `bench serve`; with a time scale, a
/// second column gives the figures converted to simulated time.
pub fn render_table(facts: &RunFacts, wall: &Summary, sim: Option<&Summary>) -> String {
    let mut t = Table {
        out: String::new(),
        two_columns: sim.is_some(),
    };
    t.heading("Serving Benchmark Result", '=');
    if let (Some(scale), Some(_)) = (facts.time_scale, sim) {
        let hw: String = [
            ("hardware", &facts.hardware),
            ("model", &facts.modeled_model),
            ("mode", &facts.sim_mode),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| format!(", {k} {v}")))
        .collect();
        let _ = writeln!(t.out, "time_scale {scale} (simulated = wall ÷ {scale}{hw})");
        let _ = writeln!(t.out, "{:<38} {:>10} {:>10}", "", "wall", "simulated");
    }
    let both = |f: &dyn Fn(&Summary) -> String| (f(wall), sim.map(f));
    t.row("Successful requests:", wall.completed.to_string(), None);
    t.row("Failed requests:", wall.failed.to_string(), None);
    for (kind, n) in &wall.failures_by_kind {
        t.row(&format!("  {kind}:"), n.to_string(), None);
    }
    if facts.unsent > 0 {
        t.row("Unsent at end of duration:", facts.unsent.to_string(), None);
    }
    if let Some(c) = facts.max_concurrency {
        t.row("Maximum request concurrency:", c.to_string(), None);
    }
    if let Some(r) = facts.request_rate.filter(|r| r.is_finite()) {
        t.row("Request rate configured (RPS):", f2(r), None);
    }
    t.row("Arrival process:", facts.arrival.clone(), None);
    let (w, s) = both(&|x| f2(x.duration_s));
    t.row("Benchmark duration (s):", w, s);
    t.row(
        "Total input tokens:",
        wall.total_input_tokens.to_string(),
        None,
    );
    t.row(
        "Total generated tokens:",
        wall.total_output_tokens.to_string(),
        None,
    );
    let (w, s) = both(&|x| f2(x.request_throughput));
    t.row("Request throughput (req/s):", w, s);
    if wall.request_goodput.is_some() {
        let (w, s) = both(&|x| f2(x.request_goodput.unwrap_or(0.0)));
        t.row("Request goodput (req/s):", w, s);
    }
    let (w, s) = both(&|x| f2(x.output_throughput));
    t.row("Output token throughput (tok/s):", w, s);
    let (w, s) = both(&|x| f2(x.max_output_tokens_per_s));
    t.row("Peak output token throughput (tok/s):", w, s);
    t.row(
        "Peak concurrent requests:",
        wall.max_concurrent_requests.to_string(),
        None,
    );
    let (w, s) = both(&|x| f2(x.total_token_throughput));
    t.row("Total Token throughput (tok/s):", w, s);
    type Section = (&'static str, &'static str, fn(&Summary) -> &Stats);
    let sections: [Section; 4] = [
        ("Time to First Token", "TTFT", |s| &s.ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", |s| {
            &s.tpot
        }),
        ("Inter-token Latency", "ITL", |s| &s.itl),
        ("End-to-end Latency", "E2EL", |s| &s.e2el),
    ];
    for (title, short, get) in sections {
        t.heading(title, '-');
        let (w, s) = both(&|x| f2(get(x).mean_ms));
        t.row(&format!("Mean {short} (ms):"), w, s);
        let (w, s) = both(&|x| f2(get(x).median_ms));
        t.row(&format!("Median {short} (ms):"), w, s);
        for (i, (p, _)) in get(wall).percentiles_ms.iter().enumerate() {
            let (w, s) = both(&|x| f2(get(x).percentiles_ms.get(i).map_or(0.0, |v| v.1)));
            t.row(&format!("P{} {short} (ms):", percentile_word(*p)), w, s);
        }
    }
    if facts.open_loop && facts.max_concurrency.is_some() {
        t.heading("Client queue time (in latencies above)", '-');
        let (w, s) = both(&|x| f2(x.client_queue.mean_ms));
        t.row("Mean queue (ms):", w, s);
        let (w, s) = both(&|x| f2(x.client_queue.max_ms));
        t.row("Max queue (ms):", w, s);
    }
    let _ = writeln!(t.out, "{}", "=".repeat(60));
    t.out
}

/// `YYYYMMDD-HHMMSS` in UTC for seconds since the Unix epoch.
pub fn utc_stamp(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's published algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{SloSpec, summarize};
    use crate::record::tests::record_with_chunks;

    fn facts() -> RunFacts {
        RunFacts {
            date: "20250101-000000".into(),
            backend: "openai".into(),
            label: "openai".into(),
            model_id: "m".into(),
            tokenizer_id: None,
            num_prompts: 2,
            request_rate: None,
            burstiness: 1.0,
            max_concurrency: None,
            arrival: "burst".into(),
            seed: 0,
            dataset_name: "random".into(),
            base_urls: vec!["http://x".into()],
            open_loop: false,
            time_scale: Some(2.0),
            hardware: Some("h800".into()),
            modeled_model: None,
            sim_mode: None,
            unsent: 0,
            warmup_failures: 0,
            slo_ms: Map::new(),
            metadata: vec![("tp".into(), "1".into())],
        }
    }

    #[test]
    fn summary_json_uses_vllm_keys_and_simulated_block() {
        let records = vec![record_with_chunks(0.0, 0.0, &[0.2, 0.4], 0.4)];
        let wall = summarize(&records, &SloSpec::default(), &[99.0]);
        let scaled: Vec<_> = records.iter().map(|r| r.rescaled(2.0)).collect();
        let sim = summarize(&scaled, &SloSpec::default(), &[99.0]);
        let j = summary_json(&facts(), &wall, Some(&sim), &records, true);
        for key in [
            "date",
            "backend",
            "model_id",
            "num_prompts",
            "request_rate",
            "burstiness",
            "max_concurrency",
            "duration",
            "completed",
            "failed",
            "total_input_tokens",
            "total_output_tokens",
            "request_throughput",
            "request_goodput",
            "output_throughput",
            "total_token_throughput",
            "max_output_tokens_per_s",
            "max_concurrent_requests",
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "p99_itl_ms",
            "median_e2el_ms",
            "ttfts",
            "itls",
            "input_lens",
            "output_lens",
            "errors",
            "tp",
        ] {
            assert!(j.get(key).is_some(), "missing {key}");
        }
        assert_eq!(j["request_rate"], "inf");
        assert!((j["mean_ttft_ms"].as_f64().unwrap() - 200.0).abs() < 1e-9);
        assert!((j["simulated"]["mean_ttft_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(j["simulated"]["time_scale"], 2.0);
    }

    #[test]
    fn table_shows_simulated_column_with_scale() {
        let records = vec![record_with_chunks(0.0, 0.0, &[0.2, 0.4], 0.4)];
        let wall = summarize(&records, &SloSpec::default(), &[99.0]);
        let sim = summarize(&[records[0].rescaled(2.0)], &SloSpec::default(), &[99.0]);
        let t = render_table(&facts(), &wall, Some(&sim));
        assert!(t.contains("time_scale 2"));
        assert!(t.contains("Mean TTFT (ms):"));
        let line = t.lines().find(|l| l.starts_with("Mean TTFT")).unwrap();
        assert!(line.contains("200.00") && line.contains("100.00"), "{line}");
    }

    #[test]
    fn utc_stamp_formats_known_instants() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400 + 3_723), "20000229-010203");
    }

    #[test]
    fn percentile_words_match_vllm() {
        assert_eq!(percentile_word(99.0), "p99".trim_start_matches('p'));
        assert_eq!(percentile_word(99.9), "99.9");
    }
}
