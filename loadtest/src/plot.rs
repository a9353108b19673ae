//! SVG plots, written by hand (no font or C dependencies): latency CDFs, throughput and
//! concurrency over time, and the sweep's throughput–latency curve.
//!
//! Invariants: output is a self-contained SVG 1.1 document; all text is XML-escaped; an empty
//! series draws nothing (never NaN coordinates); axes always include their data range.

use crate::metrics::{Stats, Summary};
use crate::record::RequestRecord;
use std::fmt::Write as _;

const PANEL_W: f64 = 480.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_R: f64 = 16.0;
const MARGIN_T: f64 = 30.0;
const MARGIN_B: f64 = 42.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A named polyline.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Panel title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
    /// Draw a marker at each point (for sparse data such as sweep points).
    pub markers: bool,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn axis_range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
    }
    let step = nice_step(hi - lo, 5.0);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

fn render_panel(out: &mut String, chart: &Chart, ox: f64, oy: f64) {
    let pw = PANEL_W - MARGIN_L - MARGIN_R;
    let ph = PANEL_H - MARGIN_T - MARGIN_B;
    let all = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1, xs) = axis_range(all().map(|p| p.0), true);
    let (y0, y1, ys) = axis_range(all().map(|p| p.1), true);
    let px = |x: f64| ox + MARGIN_L + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| oy + MARGIN_T + ph - (y - y0) / (y1 - y0) * ph;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" text-anchor="middle">{}</text>"#,
        ox + PANEL_W / 2.0,
        oy + 18.0,
        escape(&chart.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##,
        ox + MARGIN_L,
        oy + MARGIN_T
    );
    let mut t = x0;
    while t <= x1 + xs * 1e-6 {
        let x = px(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
            oy + MARGIN_T,
            oy + MARGIN_T + ph,
            oy + MARGIN_T + ph + 13.0,
            fmt_tick(t, xs)
        );
        t += xs;
    }
    let mut t = y0;
    while t <= y1 + ys * 1e-6 {
        let y = py(t);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            ox + MARGIN_L,
            ox + MARGIN_L + pw,
            ox + MARGIN_L - 4.0,
            y + 3.0,
            fmt_tick(t, ys)
        );
        t += ys;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
        ox + MARGIN_L + pw / 2.0,
        oy + PANEL_H - 8.0,
        escape(&chart.x_label)
    );
    let (lx, ly) = (ox + 14.0, oy + MARGIN_T + ph / 2.0);
    let _ = writeln!(
        out,
        r#"<text x="{lx:.1}" y="{ly:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
        escape(&chart.y_label)
    );
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
            if chart.markers {
                for p in &pts {
                    if let Some((x, y)) = p.split_once(',') {
                        let _ =
                            writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                    }
                }
            }
        }
        let ly = oy + MARGIN_T + 14.0 + 14.0 * i as f64;
        let lx = ox + MARGIN_L + pw - 150.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{ly:.1}" font-size="10">{}</text>"#,
            ly - 4.0,
            lx + 16.0,
            ly - 4.0,
            lx + 20.0,
            escape(&s.name)
        );
    }
}

/// Renders panels on a grid of `cols` columns as one SVG document.
pub fn render(charts: &[Chart], cols: usize) -> String {
    let cols = cols.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(cols).max(1);
    let (w, h) = (PANEL_W * cols as f64, PANEL_H * rows as f64);
    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, c) in charts.iter().enumerate() {
        render_panel(
            &mut out,
            c,
            (i % cols) as f64 * PANEL_W,
            (i / cols) as f64 * PANEL_H,
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Empirical CDF points of `values_ms`, at most ~500 of them.
fn cdf(mut values_ms: Vec<f64>) -> Vec<(f64, f64)> {
    values_ms.retain(|v| v.is_finite());
    values_ms.sort_by(f64::total_cmp);
    let n = values_ms.len();
    let stride = n.div_ceil(500).max(1);
    let mut pts: Vec<(f64, f64)> = values_ms
        .iter()
        .enumerate()
        .step_by(stride)
        .map(|(i, &v)| (v, (i + 1) as f64 / n as f64))
        .collect();
    if let (Some(&last), Some(p)) = (values_ms.last(), pts.last())
        && p.1 < 1.0
    {
        pts.push((last, 1.0));
    }
    pts
}

/// Latency CDFs (TTFT, TPOT, ITL, E2EL), one series per named record set (e.g. wall and
/// simulated time).
pub fn latency_cdf_svg(sets: &[(&str, &[RequestRecord])]) -> String {
    type Extract = fn(&RequestRecord) -> Vec<f64>;
    let metrics: [(&str, Extract); 4] = [
        ("TTFT", |r| r.ttft_s().into_iter().collect()),
        ("TPOT", |r| r.tpot_s().into_iter().collect()),
        ("ITL", RequestRecord::itls_s),
        ("E2EL", |r| vec![r.e2el_s()]),
    ];
    let charts: Vec<Chart> = metrics
        .iter()
        .map(|(name, get)| Chart {
            title: format!("{name} CDF (successful requests)"),
            x_label: format!("{name} (ms)"),
            y_label: "fraction ≤ x".into(),
            series: sets
                .iter()
                .map(|(label, recs)| Series {
                    name: (*label).to_owned(),
                    points: cdf(recs
                        .iter()
                        .filter(|r| r.success())
                        .flat_map(get)
                        .map(|s| s * 1e3)
                        .collect()),
                })
                .collect(),
            markers: false,
        })
        .collect();
    render(&charts, 2)
}

/// Output tokens/s and concurrency over the run (1 s buckets).
pub fn timeline_svg(summary: &Summary, time_label: &str) -> String {
    let tl = &summary.timeline;
    let series = |name: &str, f: fn(&crate::metrics::TimelinePoint) -> f64| Series {
        name: name.into(),
        points: tl
            .iter()
            .flat_map(|p| [(p.t_s, f(p)), (p.t_s + 1.0, f(p))])
            .collect(),
    };
    let charts = [
        Chart {
            title: "Output token throughput".into(),
            x_label: format!("time since start ({time_label} s)"),
            y_label: "tokens/s".into(),
            series: vec![series("output tok/s", |p| p.output_tokens_per_s)],
            markers: false,
        },
        Chart {
            title: "Requests in flight".into(),
            x_label: format!("time since start ({time_label} s)"),
            y_label: "concurrency (time-averaged)".into(),
            series: vec![series("in flight", |p| p.concurrency)],
            markers: false,
        },
    ];
    render(&charts, 1)
}

/// The sweep curve: latency against output throughput, one point per run.
pub fn sweep_svg(points: &[&Summary], p_high: Option<f64>, domain: &str) -> String {
    let idx = |s: &Stats| {
        p_high
            .and_then(|p| s.percentiles_ms.iter().find(|(q, _)| *q == p))
            .map(|(_, v)| *v)
    };
    let chart = |name: &str, get: fn(&Summary) -> &Stats| {
        let mut series = vec![Series {
            name: format!("median {name}"),
            points: points
                .iter()
                .map(|s| (s.output_throughput, get(s).median_ms))
                .collect(),
        }];
        if let Some(p) = p_high {
            series.push(Series {
                name: format!("p{} {name}", crate::report::percentile_word(p)),
                points: points
                    .iter()
                    .map(|s| (s.output_throughput, idx(get(s)).unwrap_or(0.0)))
                    .collect(),
            });
        }
        Chart {
            title: format!("{name} vs throughput ({domain})"),
            x_label: format!("output throughput (tok/s, {domain})"),
            y_label: format!("{name} (ms, {domain})"),
            series,
            markers: true,
        }
    };
    let charts = [
        chart("TTFT", |s| &s.ttft),
        chart("TPOT", |s| &s.tpot),
        chart("E2EL", |s| &s.e2el),
    ];
    render(&charts, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{SloSpec, summarize};
    use crate::record::tests::record_with_chunks;

    #[test]
    fn nice_steps_are_1_2_5_multiples() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(0.3, 5.0), 0.05);
    }

    #[test]
    fn cdf_ends_at_one_and_is_monotone() {
        let pts = cdf((0..2000).map(f64::from).rev().collect());
        assert!(pts.len() <= 502);
        assert_eq!(pts.last().map(|p| p.1), Some(1.0));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn svg_documents_are_well_formed_and_escaped() {
        let recs = vec![record_with_chunks(0.0, 0.0, &[0.1, 0.2, 0.3], 0.3)];
        let svg = latency_cdf_svg(&[("wall <clock>", &recs)]);
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("wall &lt;clock&gt;"));
        assert!(!svg.contains("NaN"));
        let s = summarize(&recs, &SloSpec::default(), &[99.0]);
        assert!(timeline_svg(&s, "wall").contains("<polyline"));
        assert_eq!(
            sweep_svg(&[&s, &s], Some(99.0), "wall")
                .matches("<circle")
                .count(),
            12
        );
        let empty = summarize(&[], &SloSpec::default(), &[]);
        assert!(!latency_cdf_svg(&[("x", &[])]).contains("NaN"));
        assert!(!timeline_svg(&empty, "wall").contains("NaN"));
    }
}
