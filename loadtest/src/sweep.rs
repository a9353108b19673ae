//! The sweep summary: one row per run point, the throughput–latency curve as a table.
//!
//! Invariant: rows appear in the order the points were given on the command line.

use crate::metrics::{Stats, Summary};
use crate::plan::Point;
use crate::report::percentile_word;
use serde_json::{Value, json};
use std::fmt::Write as _;

/// One finished point of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct SweepRow<'a> {
    /// Rate and cap of the run.
    pub point: &'a Point,
    /// Wall-clock summary.
    pub wall: &'a Summary,
    /// Simulated-time summary, if a time scale is known.
    pub simulated: Option<&'a Summary>,
}

fn pct(s: &Stats, p: Option<f64>) -> f64 {
    p.and_then(|p| s.percentiles_ms.iter().find(|(q, _)| *q == p))
        .map_or(s.max_ms, |(_, v)| *v)
}

fn rate_text(point: &Point) -> String {
    match point.request_rate {
        Some(r) if r.is_finite() => format!("{r}"),
        Some(_) => "inf".into(),
        None => "-".into(),
    }
}

/// The highest requested percentile, used for the tail column.
pub fn tail_percentile(percentiles: &[f64]) -> Option<f64> {
    percentiles
        .iter()
        .copied()
        .fold(None, |m, p| Some(m.map_or(p, |x: f64| x.max(p))))
}

/// Renders the sweep table. Latency columns are in the simulated domain when every row has one.
pub fn render_sweep_table(rows: &[SweepRow<'_>], percentiles: &[f64]) -> String {
    let tail = tail_percentile(percentiles);
    let tail_word = tail.map_or("max".to_owned(), |p| format!("p{}", percentile_word(p)));
    let simulated = !rows.is_empty() && rows.iter().all(|r| r.simulated.is_some());
    let mut out = String::new();
    let domain = if simulated {
        "simulated time"
    } else {
        "wall time"
    };
    let _ = writeln!(
        out,
        "==================== Sweep summary ({domain}) ===================="
    );
    if simulated {
        let _ = writeln!(
            out,
            "(rate and cap are as configured, on the wall clock; the rest is simulated time)"
        );
    }
    let _ = writeln!(
        out,
        "{:>8} {:>6} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "rate",
        "cap",
        "ok/fail",
        "req/s",
        "out tok/s",
        "TTFT med",
        &format!("TTFT {tail_word}"),
        "TPOT med",
        &format!("TPOT {tail_word}"),
        "E2EL med",
        "goodput"
    );
    for r in rows {
        let s = if simulated {
            r.simulated.unwrap_or(r.wall)
        } else {
            r.wall
        };
        let _ = writeln!(
            out,
            "{:>8} {:>6} {:>8} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>10.1} {:>9}",
            rate_text(r.point),
            r.point
                .max_concurrency
                .map_or("-".into(), |c| c.to_string()),
            format!("{}/{}", s.completed, s.failed),
            s.request_throughput,
            s.output_throughput,
            s.ttft.median_ms,
            pct(&s.ttft, tail),
            s.tpot.median_ms,
            pct(&s.tpot, tail),
            s.e2el.median_ms,
            s.request_goodput.map_or("-".into(), |g| format!("{g:.2}")),
        );
    }
    out
}

/// The sweep JSON: the sweep settings and each point's full summary.
pub fn sweep_json(rows: &[SweepRow<'_>], point_summaries: Vec<Value>) -> Value {
    json!({
        "points": rows.iter().zip(point_summaries).map(|(r, summary)| json!({
            "request_rate": r.point.request_rate.filter(|x| x.is_finite()).map_or(json!("inf"), |x| json!(x)),
            "max_concurrency": r.point.max_concurrency,
            "summary": summary,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{SloSpec, summarize};
    use crate::record::tests::record_with_chunks;

    #[test]
    fn table_has_one_row_per_point_in_order() {
        let s = summarize(
            &[record_with_chunks(0.0, 0.0, &[0.1, 0.2], 0.2)],
            &SloSpec::default(),
            &[99.0],
        );
        let pts = [
            Point {
                request_rate: Some(1.0),
                max_concurrency: None,
            },
            Point {
                request_rate: Some(f64::INFINITY),
                max_concurrency: Some(4),
            },
        ];
        let rows: Vec<SweepRow<'_>> = pts
            .iter()
            .map(|p| SweepRow {
                point: p,
                wall: &s,
                simulated: None,
            })
            .collect();
        let t = render_sweep_table(&rows, &[90.0, 99.0]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].contains("TTFT p99"));
        assert!(lines[2].trim_start().starts_with('1'));
        assert!(lines[3].trim_start().starts_with("inf"));
        let j = sweep_json(&rows, vec![json!({}), json!({})]);
        assert_eq!(j["points"][1]["request_rate"], "inf");
    }
}
