//! Active health checking: every `health.interval_ms`, each instance gets `GET /health` and
//! `GET /internal/stats`; the answers feed the instances' health state and the load signals the
//! policies read, and the per-instance gauges. After each round, prefill/decode pairs whose KV
//! layer counts differ ([`crate::compat`]) are logged when they appear (warn) and disappear (info).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use crate::compat;
use crate::metrics::catalog;
use crate::state::AppState;

/// Probes every instance once, concurrently.
pub async fn probe_all(state: &AppState) {
    let orch = &state.orchestrator;
    let instances = orch
        .prefill
        .instances()
        .iter()
        .chain(orch.decode.instances().iter());
    join_all(instances.map(|inst| async move {
        match orch.client.probe(inst).await {
            Ok(stats) => {
                let kv = stats.kv_usage;
                if inst.probe_succeeded(stats, &orch.health) == Some(true) {
                    tracing::info!(instance = %inst.id, role = inst.role.as_str(), "instance healthy again");
                }
                let labels = [("role", inst.role.as_str()), ("instance", &*inst.id)];
                state.metrics.gauge(&catalog::ROUTER_INSTANCE_KV_CACHE_USAGE_PERC, &labels).set(kv);
            }
            Err(e) => {
                if inst.failed(&orch.health) == Some(false) {
                    tracing::warn!(instance = %inst.id, role = inst.role.as_str(), error = %e, "instance unhealthy");
                }
            }
        }
        let labels = [("role", inst.role.as_str()), ("instance", &*inst.id)];
        let healthy = if inst.view().healthy { 1.0 } else { 0.0 };
        state.metrics.gauge(&catalog::ROUTER_INSTANCE_HEALTHY, &labels).set(healthy);
        state
            .metrics
            .gauge(&catalog::ROUTER_INSTANCE_INFLIGHT_REQUESTS, &labels)
            .set(f64::from(inst.inflight_requests()));
    }))
    .await;
    log_mismatch_changes(state);
}

fn log_mismatch_changes(state: &AppState) {
    let orch = &state.orchestrator;
    let now = compat::all_mismatches(&orch.prefill, &orch.decode);
    let mut last = state.pair_mismatches.lock();
    for m in now.iter().filter(|m| !last.contains(m)) {
        tracing::warn!(
            prefill = %m.prefill,
            prefill_kv_layers = m.prefill_layers,
            decode = %m.decode,
            decode_kv_layers = m.decode_layers,
            "KV layout mismatch, the pair is unusable: {m}"
        );
    }
    for m in last.iter().filter(|m| !now.contains(m)) {
        tracing::info!(prefill = %m.prefill, decode = %m.decode, "KV layouts match again; the pair is usable");
    }
    *last = now;
}

/// Probes forever at the configured interval (and keeps the metrics registry drained). Runs until
/// the task is dropped or aborted.
pub async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.health.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        probe_all(&state).await;
        state.metrics.run_upkeep();
    }
}
