//! The services render every metric the catalog gives their components (`prefill`/`decode`,
//! `fabric`, `ep`) after a short scripted workload, with real values where the workload makes
//! them non-zero: per-position MTP acceptance, link-class bytes, tokens per expert.

mod common;

use std::convert::Infallible;

use common::*;
use pdserve_engine::{StepClock, StepPlan};
use pdserve_protocol::metrics::{self as catalog, MetricDef};
use pdserve_worker::{
    DecodeListeners, DecodeService, EngineParts, FabricStepReport, KvTransferClock,
    LinearFabricClock, PrefillService, SeqParams,
};

/// The linear stand-in plus a fabric report that is a pure function of the step's batch: each
/// token moves 1000 bytes over NVLink and 100 over IB and is routed to experts `0..4`.
#[derive(Debug)]
struct ReportingClock {
    inner: LinearFabricClock,
    last_tokens: Option<usize>,
}

impl<R> StepClock<SeqParams, R> for ReportingClock {
    type Error = Infallible;

    fn step_duration_ns(
        &mut self,
        plan: &StepPlan<SeqParams>,
        routing: &R,
    ) -> Result<u64, Infallible> {
        self.last_tokens = Some(plan.num_batched_tokens);
        self.inner.step_duration_ns(plan, routing)
    }
}

impl KvTransferClock for ReportingClock {
    fn kv_transfer_ns(&mut self, tokens: usize) -> u64 {
        self.inner.kv_transfer_ns(tokens)
    }

    fn take_step_report(&mut self) -> Option<FabricStepReport> {
        let tokens = self.last_tokens.take()? as u64;
        Some(FabricStepReport {
            nvlink_bytes: 1000.0 * tokens as f64,
            ib_bytes: 100.0 * tokens as f64,
            nvlink_busy_s: 1e-6 * tokens as f64,
            ib_busy_s: 1e-7 * tokens as f64,
            dispatch_s: Some(2e-5),
            combine_s: Some(3e-5),
            tbo_overlap_ratio: Some(0.75),
            expert_tokens: vec![tokens; 4],
            balancedness: Some(0.9),
        })
    }
}

fn reporting_parts() -> EngineParts<TestBackend, ReportingClock> {
    EngineParts {
        executor: TestBackend::new(),
        clock: ReportingClock {
            inner: clock(1_000, 1_000),
            last_tokens: None,
        },
        eos_token_ids: vec![EOS],
        sim: None,
    }
}

/// The value of the first sample of `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (label_part, value) = rest.rsplit_once(' ')?;
        labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())
            .flatten()
    })
}

fn assert_renders(text: &str, defs: impl Iterator<Item = &'static MetricDef>, instance: &str) {
    for def in defs {
        assert!(
            text.contains(&format!("# TYPE {} {}", def.name, def.kind.as_str())),
            "{} is not rendered:\n{text}",
            def.name
        );
        assert!(
            text.lines()
                .filter(|l| l.starts_with(def.name))
                .all(|l| l.contains(&format!("instance=\"{instance}\""))),
            "{} lacks instance=\"{instance}\"",
            def.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_metric_of_the_services_is_rendered_with_real_values() {
    let mut decode_config = decode_config();
    decode_config.engine.scheduler.spec_tokens = 1;
    let listeners = DecodeListeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        kv: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let decode_base = format!("http://{}", listeners.http.local_addr().unwrap());
    let decode = DecodeService::start(decode_config, reporting_parts(), listeners.kv).unwrap();
    let kv_addr = decode.kv_addr().to_string();
    let decode_metrics = decode.metrics_renderer();
    let (stop_decode, decode_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(decode.serve(listeners.http, async {
        let _ = decode_stopped.await;
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let prefill_base = format!("http://{}", listener.local_addr().unwrap());
    let prefill = PrefillService::start(prefill_config(), reporting_parts()).unwrap();
    let prefill_metrics = prefill.metrics_renderer();
    let (stop_prefill, prefill_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(prefill.serve(listener, async {
        let _ = prefill_stopped.await;
    }));

    let prompt = prompt(100);
    let events = open_decode(&decode_base, &decode_request("m-1", &prompt, 12, 10_000)).await;
    let (status, body) = post_json(
        &prefill_base,
        "/internal/prefill",
        &prefill_request("m-1", &prompt, 12, &kv_addr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    events.collect().await;
    eventually_stats(&decode_base, "decode frees its blocks", all_blocks_free).await;

    let d = metrics_text(&decode_base).await;
    let p = metrics_text(&prefill_base).await;
    assert_eq!(
        decode_metrics()
            .lines()
            .filter(|l| l.starts_with("# TYPE"))
            .count(),
        d.lines().filter(|l| l.starts_with("# TYPE")).count(),
        "the renderer and /metrics render the same registry"
    );
    assert!(prefill_metrics().contains("pdserve_prefill_steps_total"));
    let of = |c: &'static str| catalog::of_component(c);
    assert_renders(
        &d,
        of("decode").chain(of("fabric")).chain(of("ep")),
        "decode-test",
    );
    assert_renders(
        &p,
        of("prefill").chain(of("fabric")).chain(of("ep")),
        "prefill-test",
    );

    // Per-position MTP counters: the scripted drafts are sometimes accepted.
    let drafts = sample(&d, catalog::DECODE_SPEC_DECODE_NUM_DRAFTS_TOTAL.name, &[]).unwrap();
    let accepted = sample(
        &d,
        catalog::DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS_TOTAL.name,
        &[("position", "0")],
    )
    .unwrap();
    assert!(drafts > 0.0 && accepted > 0.0 && accepted <= drafts, "{d}");
    assert_eq!(
        Some(accepted),
        sample(
            &d,
            catalog::DECODE_SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL.name,
            &[]
        ),
        "one draft position: per-position equals total"
    );
    // Fabric: bytes per link class follow the reported batches (100 prompt tokens at prefill).
    let link = |text: &str, class: &str| {
        sample(
            text,
            catalog::FABRIC_LINK_BYTES_TOTAL.name,
            &[("link", class)],
        )
        .unwrap()
    };
    assert_eq!(link(&p, "nvlink"), 100_000.0, "{p}");
    assert_eq!(link(&p, "ib"), 10_000.0);
    assert!(link(&d, "nvlink") > 0.0 && link(&d, "nvlink") == 10.0 * link(&d, "ib"));
    let busy_sum = format!("{}_sum", catalog::FABRIC_LINK_BUSY_SECONDS.name);
    let busy = sample(&p, &busy_sum, &[("link", "nvlink")]).unwrap();
    assert!((busy - 1e-4).abs() < 1e-12, "{busy}");
    let expert = |e: &str| sample(&p, catalog::EP_EXPERT_TOKENS_TOTAL.name, &[("expert", e)]);
    assert_eq!(
        (expert("0"), expert("3"), expert("4")),
        (Some(100.0), Some(100.0), None)
    );
    let steps = sample(&d, "pdserve_decode_step_tokens_count", &[]).unwrap();
    let overlap = format!("{}_count", catalog::FABRIC_TBO_OVERLAP_RATIO.name);
    assert_eq!(sample(&d, &overlap, &[("role", "decode")]), Some(steps));
    // Prefill per-request timing and the router-facing transfer metrics have samples.
    assert_eq!(
        sample(
            &p,
            "pdserve_prefill_request_prefill_time_seconds_count",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &d,
            "pdserve_decode_requests_finished_total",
            &[("finished_reason", "length")]
        ),
        Some(1.0)
    );
    let _ = (stop_decode.send(()), stop_prefill.send(()));
}
