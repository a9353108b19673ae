//! A Prometheus registry for catalog metrics (feature `prometheus`): histogram buckets, units and
//! help texts come from the [`MetricDef`]s; handles are registered by definition and labels. Each
//! service owns one (not a process-global recorder, so several services in one process keep
//! separate counts).

use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::{MetricDef, MetricKind};

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

/// A registry of catalog metrics and its text exposition.
pub struct CatalogRegistry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for CatalogRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogRegistry").finish_non_exhaustive()
    }
}

/// The catalog's unit of `def` as the `metrics` crate's, when it has one.
fn unit_of(def: &MetricDef) -> Option<Unit> {
    match def.unit {
        "seconds" => Some(Unit::Seconds),
        "bytes" => Some(Unit::Bytes),
        _ => None,
    }
}

impl CatalogRegistry {
    /// A registry with the buckets and descriptions of `defs`; with `instance`, every series
    /// carries the label `instance="<instance>"`.
    pub fn new<'a>(
        defs: impl IntoIterator<Item = &'a MetricDef>,
        instance: Option<&str>,
    ) -> Result<Self, BuildError> {
        let defs: Vec<&MetricDef> = defs.into_iter().collect();
        let mut builder = PrometheusBuilder::new();
        if let Some(instance) = instance {
            builder = builder.add_global_label("instance", instance);
        }
        for d in defs.iter().filter(|d| d.kind == MetricKind::Histogram) {
            builder =
                builder.set_buckets_for_metric(Matcher::Full(d.name.to_string()), d.buckets)?;
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for d in defs {
            let name = KeyName::from_const_str(d.name);
            let help = d.help.into();
            match d.kind {
                MetricKind::Counter => recorder.describe_counter(name, unit_of(d), help),
                MetricKind::Gauge => recorder.describe_gauge(name, unit_of(d), help),
                MetricKind::Histogram => recorder.describe_histogram(name, unit_of(d), help),
            }
        }
        Ok(Self { recorder, handle })
    }

    fn key(def: &MetricDef, labels: &[(&'static str, &str)]) -> Key {
        debug_assert!(
            labels.iter().all(|(k, _)| def.labels.contains(k)),
            "{}: label not in the catalog",
            def.name
        );
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(def.name, labels)
    }

    /// A counter handle.
    pub fn counter(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(def, labels), &METADATA)
    }

    /// A gauge handle.
    pub fn gauge(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(def, labels), &METADATA)
    }

    /// A histogram handle.
    pub fn histogram(&self, def: &MetricDef, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(def, labels), &METADATA)
    }

    /// A cheap renderer of this registry's text exposition (drains histogram buffers first).
    pub fn renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let handle = self.handle.clone();
        move || {
            handle.run_upkeep();
            handle.render()
        }
    }

    /// The text exposition now.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Drains histogram buffers; call periodically when nobody scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}
