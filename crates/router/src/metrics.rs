//! The router's Prometheus metrics: names, help texts, units and buckets come from the catalog
//! ([`pdserve_protocol::metrics`], re-exported as [`catalog`]); values are recorded through
//! [`RouterMetrics`] into a registry owned by the router (not a process-global recorder, so
//! several routers, or tests, in one process keep separate counts) and rendered on `/metrics`.
//!
//! Extra sources ([`RouterMetrics::add_source`]) let one process expose one scrape target:
//! `pdserve up` adds its in-process prefill and decode instances, whose text is merged after the
//! router's by [`merge_exposition`] (one `# HELP`/`# TYPE` per family, samples of a family kept
//! together, as the text format requires).

use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::BuildError;
pub use pdserve_protocol::metrics as catalog;
use pdserve_protocol::metrics::{CatalogRegistry, MetricDef};

/// Renders another registry's Prometheus text (e.g. an in-process instance).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// The router's metrics registry.
pub struct RouterMetrics {
    registry: CatalogRegistry,
    sources: Mutex<Vec<MetricsSource>>,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

impl RouterMetrics {
    /// A fresh registry with the catalog's buckets and descriptions of every router metric.
    pub fn new() -> Result<RouterMetrics, BuildError> {
        Ok(RouterMetrics {
            registry: CatalogRegistry::new(catalog::of_component("router"), None)?,
            sources: Mutex::new(Vec::new()),
        })
    }

    /// Appends another registry's text to every [`RouterMetrics::render`].
    pub fn add_source(&self, source: MetricsSource) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.push(source);
        }
    }

    /// Prometheus text exposition: the router's metrics, then every added source's, merged.
    pub fn render(&self) -> String {
        let own = self.registry.render();
        let sources: Vec<MetricsSource> = match self.sources.lock() {
            Ok(s) => s.clone(),
            Err(_) => Vec::new(),
        };
        if sources.is_empty() {
            return own;
        }
        let mut texts = vec![own];
        texts.extend(sources.iter().map(|s| s()));
        merge_exposition(&texts)
    }

    /// Drains histogram buffers; call periodically when nobody scrapes.
    pub fn run_upkeep(&self) {
        self.registry.run_upkeep();
    }

    /// A counter handle.
    pub fn counter(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Counter {
        self.registry.counter(def, labels)
    }

    /// A gauge handle.
    pub fn gauge(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Gauge {
        self.registry.gauge(def, labels)
    }

    /// A histogram handle.
    pub fn histogram(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Histogram {
        self.registry.histogram(def, labels)
    }

    /// Records one answered request.
    pub fn request_answered(&self, endpoint: &str, status: u16) {
        let status = status.to_string();
        self.counter(
            &catalog::ROUTER_REQUESTS_TOTAL,
            &[("endpoint", endpoint), ("status", &status)],
        )
        .increment(1);
    }

    /// Records one finished generation (`stop`, `length`, `abort`, `error`).
    pub fn generation_finished(&self, finished_reason: &'static str) {
        self.counter(
            &catalog::ROUTER_REQUESTS_FINISHED_TOTAL,
            &[("finished_reason", finished_reason)],
        )
        .increment(1);
    }

    /// Records a duration sample in seconds.
    pub fn observe(&self, def: &MetricDef, seconds: f64) {
        self.histogram(def, &[]).record(seconds);
    }

    /// Adds to an unlabelled counter.
    pub fn add(&self, def: &MetricDef, n: u64) {
        self.counter(def, &[]).increment(n);
    }
}

/// The `finished_reason` label of a client-visible finish reason.
pub fn finish_label(reason: pdserve_protocol::openai::FinishReason) -> &'static str {
    match reason {
        pdserve_protocol::openai::FinishReason::Stop => "stop",
        pdserve_protocol::openai::FinishReason::Length => "length",
    }
}

/// The metric family a sample line belongs to: its name, less a histogram's or summary's
/// `_bucket`/`_sum`/`_count` when `families` knows the base.
fn family_of<'a>(name: &'a str, known: &dyn Fn(&str) -> bool) -> &'a str {
    if known(name) {
        return name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && known(base)
        {
            return base;
        }
    }
    name
}

/// Merges Prometheus text expositions into one: each family once, with the first `# HELP` and
/// `# TYPE` seen for it, followed by its samples from every text in order (series of the same
/// family from several registries, told apart by their labels, end up together). Families keep
/// the order of their first appearance.
pub fn merge_exposition(texts: &[String]) -> String {
    #[derive(Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    let mut families: Vec<Family> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    let mut entry = |name: &str| -> usize {
        *index.entry(name.to_string()).or_insert_with(|| {
            families.push(Family::default());
            families.len() - 1
        })
    };
    let mut slots: Vec<(usize, Line)> = Vec::new();
    enum Line {
        Help(String),
        Type(String),
        Sample(String),
    }
    for text in texts {
        let typed: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let known = |n: &str| typed.contains(n);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                slots.push((entry(name), Line::Help(line.to_string())));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                slots.push((entry(name), Line::Type(line.to_string())));
            } else if !line.is_empty() && !line.starts_with('#') {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = family_of(&line[..end], &known);
                slots.push((entry(name), Line::Sample(line.to_string())));
            }
        }
    }
    for (i, line) in slots {
        let f = &mut families[i];
        match line {
            Line::Help(l) => {
                f.help.get_or_insert(l);
            }
            Line::Type(l) => {
                f.kind.get_or_insert(l);
            }
            Line::Sample(l) => f.samples.push(l),
        }
    }
    let mut out = String::new();
    for f in &families {
        for line in [&f.help, &f.kind].into_iter().flatten().chain(&f.samples) {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::*;

    #[test]
    fn recorded_metrics_render_with_their_catalog_names_and_help() {
        let m = RouterMetrics::new().unwrap();
        m.request_answered("chat_completions", 200);
        m.observe(&ROUTER_TIME_TO_FIRST_TOKEN_SECONDS, 0.02);
        m.add(&ROUTER_PROMPT_TOKENS_TOTAL, 7);
        let text = m.render();
        assert!(
            text.contains(
                r#"pdserve_router_requests_total{endpoint="chat_completions",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("pdserve_router_time_to_first_token_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("pdserve_router_prompt_tokens_total 7"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "# HELP pdserve_router_prompt_tokens_total {}",
                ROUTER_PROMPT_TOKENS_TOTAL.help
            )),
            "{text}"
        );
    }

    #[test]
    fn two_registries_keep_separate_counts() {
        let a = RouterMetrics::new().unwrap();
        let b = RouterMetrics::new().unwrap();
        a.add(&ROUTER_GENERATION_TOKENS_TOTAL, 3);
        assert!(
            !b.render()
                .contains("pdserve_router_generation_tokens_total 3")
        );
    }

    #[test]
    fn merging_keeps_one_header_per_family_and_groups_its_samples() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{instance=\"a\"} 1\n\n\
                 # TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n"
            .to_string();
        let b = "# HELP y Y.\n# TYPE y gauge\ny 3\n\n# HELP x_total X.\n# TYPE x_total counter\n\
                 x_total{instance=\"b\"} 4\n"
            .to_string();
        let merged = merge_exposition(&[a, b]);
        assert_eq!(
            merged,
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{instance=\"a\"} 1\n\
             x_total{instance=\"b\"} 4\n\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\n\
             h_count 2\n\n# HELP y Y.\n# TYPE y gauge\ny 3\n\n"
        );
    }

    #[test]
    fn added_sources_render_after_the_routers_own_metrics() {
        let m = RouterMetrics::new().unwrap();
        m.add(&ROUTER_PROMPT_TOKENS_TOTAL, 2);
        m.add_source(Arc::new(|| {
            "# TYPE pdserve_decode_steps_total counter\n\
             pdserve_decode_steps_total{instance=\"decode-0\"} 5\n"
                .to_string()
        }));
        let text = m.render();
        let own = text.find("pdserve_router_prompt_tokens_total 2").unwrap();
        let extra = text
            .find("pdserve_decode_steps_total{instance=\"decode-0\"} 5")
            .unwrap();
        assert!(own < extra, "{text}");
    }
}
