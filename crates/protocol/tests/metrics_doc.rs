//! The metric catalog follows the naming conventions, and docs/metrics.md, generated from it, is
//! current (the test fails when it is stale).
//! Regenerate: `PDSERVE_BLESS=1 cargo test -p pdserve-protocol --test metrics_doc`.

use std::collections::HashSet;
use std::path::PathBuf;

use pdserve_protocol::metrics::*;

#[test]
fn metrics_doc_matches_the_catalog() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md");
    let generated = markdown();
    if std::env::var_os("PDSERVE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "{} is stale: regenerate it with \
         `PDSERVE_BLESS=1 cargo test -p pdserve-protocol --test metrics_doc`",
        path.display()
    );
}

#[test]
fn names_follow_the_conventions() {
    for m in ALL {
        let rest = m.name.strip_prefix("pdserve_").unwrap_or_else(|| {
            panic!("{} lacks the pdserve_ prefix", m.name);
        });
        assert!(
            COMPONENTS.contains(&m.component()),
            "{}: unknown component",
            m.name
        );
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}: only [a-z0-9_]",
            m.name
        );
        assert!(
            rest.split('_').count() >= 3,
            "{}: component, what, unit",
            m.name
        );
        match m.kind {
            MetricKind::Counter => {
                assert!(
                    m.name.ends_with("_total"),
                    "{}: counters end in _total",
                    m.name
                )
            }
            MetricKind::Gauge | MetricKind::Histogram => {
                assert!(
                    !m.name.ends_with("_total"),
                    "{}: only counters end in _total",
                    m.name
                )
            }
        }
        if m.unit == "seconds" {
            let stem = m.name.strip_suffix("_total").unwrap_or(m.name);
            assert!(
                stem.ends_with("_seconds"),
                "{}: durations end in _seconds",
                m.name
            );
        }
        if m.unit == "bytes" {
            let stem = m.name.strip_suffix("_total").unwrap_or(m.name);
            assert!(
                stem.ends_with("_bytes"),
                "{}: byte counts end in _bytes",
                m.name
            );
        }
        if m.unit == "ratio" {
            assert!(
                m.name.ends_with("_ratio") || m.name.ends_with("_perc"),
                "{}: fractions end in _ratio or _perc",
                m.name
            );
        }
        for bad in ["_counter", "_gauge", "_time", "_size", "_ms", "_us"] {
            let stem = m.name.strip_suffix("_total").unwrap_or(m.name);
            assert!(!stem.ends_with(bad), "{}: a unit, not {bad}", m.name);
        }
        assert_eq!(
            m.kind == MetricKind::Histogram,
            !m.buckets.is_empty(),
            "{}: buckets exactly for histograms",
            m.name
        );
        assert!(
            m.buckets.windows(2).all(|w| w[0] < w[1]),
            "{}: increasing buckets",
            m.name
        );
        assert!(
            !m.help.is_empty() && !m.help.contains('\n'),
            "{}: one-line help",
            m.name
        );
    }
}

#[test]
fn names_are_unique_and_labels_are_declared() {
    let mut seen = HashSet::new();
    let declared: HashSet<&str> = LABELS.iter().map(|l| l.name).collect();
    for m in ALL {
        assert!(seen.insert(m.name), "{} listed twice", m.name);
        for l in m.labels {
            assert!(declared.contains(l), "{}: label {l} not in LABELS", m.name);
        }
    }
    for l in LABELS {
        assert!(
            ALL.iter().any(|m| m.labels.contains(&l.name)),
            "label {} is unused",
            l.name
        );
    }
}

#[test]
fn instance_scoped_metrics_carry_the_instance_label() {
    for m in ALL {
        if m.component() != "router" {
            assert_eq!(m.labels.first(), Some(&"instance"), "{}", m.name);
        }
    }
}

#[test]
fn find_resolves_histogram_series() {
    assert_eq!(
        find("pdserve_decode_step_wall_seconds_bucket").map(|m| m.name),
        Some("pdserve_decode_step_wall_seconds")
    );
    assert!(find("pdserve_router_requests_total_count").is_none());
    assert!(find("pdserve_nothing_total").is_none());
}

#[test]
fn markdown_lists_every_metric_under_its_component() {
    let md = markdown();
    for m in ALL {
        assert!(md.contains(&format!("| `{}` |", m.name)), "{}", m.name);
    }
    assert_eq!(md.matches("\n## ").count(), COMPONENTS.len() + 1);
}
