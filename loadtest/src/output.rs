//! Result files: where they go ([`result_stem`]) and the per-request JSONL and CSV formats.
//!
//! Every file of a run shares one stem: `<stem>.json` (summary), `<stem>.requests.jsonl`,
//! `<stem>.requests.csv`, `<stem>.summary.csv`, `<stem>.*.svg`. Formats are documented in
//! `loadtest/README.md`; a change here is a change there. Errors name the file.

use crate::metrics::Summary;
use crate::record::RequestRecord;
use crate::report::percentile_word;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A result file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct OutputError {
    /// The file or directory.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Writes `contents` to `path`, creating parent directories.
pub fn write_file(path: &Path, contents: &str) -> Result<(), OutputError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OutputError {
            path: dir.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, contents).map_err(|source| OutputError {
        path: path.to_owned(),
        source,
    })
}

/// The stem of a run's files: `--result-filename` without `.json`, else vLLM's default name
/// `<label>-<rate>qps[-concurrency<n>]-<model>-<date>`, inside `--result-dir`.
pub fn result_stem(
    result_dir: Option<&Path>,
    result_filename: Option<&str>,
    label: &str,
    rate: Option<f64>,
    max_concurrency: Option<usize>,
    model_id: &str,
    date: &str,
) -> PathBuf {
    let name = match result_filename {
        Some(f) => f.strip_suffix(".json").unwrap_or(f).to_owned(),
        None => {
            let rate = rate
                .filter(|r| r.is_finite())
                .map_or("inf".to_owned(), |r| r.to_string());
            let cap = max_concurrency
                .map(|c| format!("-concurrency{c}"))
                .unwrap_or_default();
            let model = model_id.rsplit('/').next().unwrap_or(model_id);
            format!("{label}-{rate}qps{cap}-{model}-{date}")
        }
    };
    result_dir.map_or_else(|| PathBuf::from(&name), |d| d.join(&name))
}

/// `<stem><suffix>` (e.g. `.requests.jsonl`).
pub fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

/// One JSONL line: everything measured about a request.
pub fn record_json(r: &RequestRecord) -> Value {
    json!({
        "index": r.index,
        "target": r.target,
        "success": r.success(),
        "intended_s": r.intended_s,
        "sent_s": r.sent_s,
        "end_s": r.end_s,
        "latency_origin": if r.open_loop { "intended" } else { "sent" },
        "queue_ms": ms(r.queue_s()),
        "ttft_ms": r.ttft_s().map(ms),
        "tpot_ms": r.tpot_s().map(ms),
        "e2el_ms": ms(r.e2el_s()),
        "itl_ms": r.itls_s().into_iter().map(ms).collect::<Vec<_>>(),
        "chunk_tokens": r.chunks.iter().map(|c| c.tokens).collect::<Vec<_>>(),
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "expected_output_tokens": r.expected_output_tokens,
        "usage_reported": r.usage_reported,
        "chunk_token_source": r.chunk_token_source,
        "error_kind": r.failure.as_ref().map(|f| f.label()),
        "error": r.failure.as_ref().map(|f| f.message.clone()),
    })
}

/// The per-request JSONL text (one object per line, in index order).
pub fn requests_jsonl(records: &[RequestRecord]) -> String {
    let mut out = String::new();
    for r in records {
        let _ = writeln!(out, "{}", record_json(r));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_default()
}

/// The per-request CSV text.
pub fn requests_csv(records: &[RequestRecord]) -> String {
    let mut out = String::from(
        "index,target,success,intended_s,sent_s,end_s,queue_ms,ttft_ms,tpot_ms,e2el_ms,mean_itl_ms,\
         prompt_tokens,output_tokens,expected_output_tokens,chunks,error_kind,error\n",
    );
    for r in records {
        let itls = r.itls_s();
        let mean_itl = (!itls.is_empty()).then(|| ms(itls.iter().sum::<f64>() / itls.len() as f64));
        let _ = writeln!(
            out,
            "{},{},{},{:.6},{:.6},{:.6},{:.3},{},{},{:.3},{},{},{},{},{},{},{}",
            r.index,
            r.target,
            r.success(),
            r.intended_s,
            r.sent_s,
            r.end_s,
            ms(r.queue_s()),
            opt(r.ttft_s().map(ms)),
            opt(r.tpot_s().map(ms)),
            ms(r.e2el_s()),
            opt(mean_itl),
            r.prompt_tokens,
            r.output_tokens,
            r.expected_output_tokens,
            r.chunks.len(),
            r.failure.as_ref().map(|f| f.label()).unwrap_or_default(),
            csv_field(r.failure.as_ref().map_or("", |f| f.message.as_str())),
        );
    }
    out
}

/// Header of the summary CSV for the given percentiles.
pub fn summary_csv_header(percentiles: &[f64]) -> String {
    let mut cols: Vec<String> = [
        "point",
        "request_rate",
        "max_concurrency",
        "domain",
        "duration",
        "completed",
        "failed",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for m in ["ttft", "tpot", "itl", "e2el"] {
        cols.push(format!("mean_{m}_ms"));
        cols.push(format!("median_{m}_ms"));
        for p in percentiles {
            cols.push(format!("p{}_{m}_ms", percentile_word(*p)));
        }
    }
    cols.join(",")
}

/// One row of the summary CSV (`domain` is `wall` or `simulated`).
pub fn summary_csv_row(
    point: usize,
    rate: Option<f64>,
    cap: Option<usize>,
    domain: &str,
    s: &Summary,
) -> String {
    let rate = rate
        .filter(|r| r.is_finite())
        .map_or("inf".to_owned(), |r| r.to_string());
    let mut cols = vec![
        point.to_string(),
        rate,
        cap.map(|c| c.to_string()).unwrap_or_default(),
        domain.to_owned(),
        format!("{:.6}", s.duration_s),
        s.completed.to_string(),
        s.failed.to_string(),
        format!("{:.6}", s.request_throughput),
        opt(s.request_goodput),
        format!("{:.6}", s.output_throughput),
        format!("{:.6}", s.total_token_throughput),
        format!("{:.3}", s.max_output_tokens_per_s),
        s.max_concurrent_requests.to_string(),
    ];
    for st in [&s.ttft, &s.tpot, &s.itl, &s.e2el] {
        cols.push(format!("{:.3}", st.mean_ms));
        cols.push(format!("{:.3}", st.median_ms));
        cols.extend(st.percentiles_ms.iter().map(|(_, v)| format!("{v:.3}")));
    }
    cols.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{SloSpec, summarize};
    use crate::record::tests::record_with_chunks;
    use crate::record::{Failure, FailureKind};

    #[test]
    fn default_stem_follows_vllm_naming() {
        let s = result_stem(
            Some(Path::new("out")),
            None,
            "openai",
            Some(4.0),
            Some(8),
            "org/model",
            "20250101-000000",
        );
        assert_eq!(
            s,
            PathBuf::from("out/openai-4qps-concurrency8-model-20250101-000000")
        );
        let s = result_stem(None, Some("run.json"), "x", None, None, "m", "d");
        assert_eq!(
            with_suffix(&s, ".requests.jsonl"),
            PathBuf::from("run.requests.jsonl")
        );
    }

    #[test]
    fn csv_quotes_error_messages_and_rows_match_header() {
        let mut r = record_with_chunks(0.0, 0.0, &[0.1], 0.2);
        r.failure = Some(Failure {
            kind: FailureKind::Http,
            status: Some(500),
            message: "a, \"b\"".into(),
        });
        let csv = requests_csv(&[r.clone()]);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with("http_500,\"a, \"\"b\"\"\"")
        );
        let s = summarize(&[r], &SloSpec::default(), &[99.0]);
        let header = summary_csv_header(&[99.0]);
        let row = summary_csv_row(0, None, None, "wall", &s);
        assert_eq!(header.split(',').count(), row.split(',').count());
    }

    #[test]
    fn jsonl_has_one_line_per_request() {
        let rs = vec![
            record_with_chunks(0.0, 0.0, &[0.1, 0.2], 0.2),
            record_with_chunks(0.0, 0.0, &[0.3], 0.3),
        ];
        let text = requests_jsonl(&rs);
        assert_eq!(text.lines().count(), 2);
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert!((first["ttft_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(first["itl_ms"].as_array().unwrap().len(), 1);
    }
}
