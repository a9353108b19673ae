//! Policies observed through the fake instances.

use pdserve_router::health::probe_all;
use pdserve_router::policy::{CacheAwareConfig, LeastLoadConfig, PolicyConfig};

use crate::common::*;

#[tokio::test]
async fn round_robin_spreads_decode_requests_evenly() {
    let c = Cluster::start(Options {
        decode: 2,
        ..Options::default()
    })
    .await;
    for _ in 0..4 {
        let (status, _, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        (c.decode[0].requests.len(), c.decode[1].requests.len()),
        (2, 2)
    );
}

#[tokio::test]
async fn cache_aware_pins_a_shared_prefix_to_one_prefill_instance() {
    let c = Cluster::start(Options {
        prefill: 3,
        prefill_policy: PolicyConfig::CacheAware(CacheAwareConfig::default()),
        ..Options::default()
    })
    .await;
    let shared = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    for i in 0..6 {
        let (status, _, _) = c
            .post(
                "/v1/chat/completions",
                chat_body(&format!("{shared} question {i}")),
            )
            .await;
        assert_eq!(status, 200);
    }
    let counts: Vec<usize> = c.prefill.iter().map(|p| p.requests.len()).collect();
    assert!(counts.contains(&6), "{counts:?}");
}

#[tokio::test]
async fn least_load_follows_the_reported_kv_usage() {
    let c = Cluster::start(Options {
        decode: 2,
        decode_policy: PolicyConfig::LeastLoad(LeastLoadConfig::default()),
        ..Options::default()
    })
    .await;
    c.decode[0].stats.lock().kv_usage = 0.95;
    probe_all(&c.state).await;
    for _ in 0..3 {
        let (_, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(headers["x-pdserve-decode-instance"], "d1");
    }
    c.decode[0].stats.lock().kv_usage = 0.0;
    c.decode[1].stats.lock().kv_usage = 0.95;
    probe_all(&c.state).await;
    let (_, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(headers["x-pdserve-decode-instance"], "d0");
}

#[tokio::test]
async fn power_of_two_avoids_the_loaded_instance_of_two() {
    let c = Cluster::start(Options {
        prefill: 2,
        prefill_policy: PolicyConfig::PowerOfTwo(LeastLoadConfig::default()),
        ..Options::default()
    })
    .await;
    c.prefill[1].stats.lock().queued_prompt_tokens = 50_000;
    probe_all(&c.state).await;
    for _ in 0..4 {
        let (_, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(headers["x-pdserve-prefill-instance"], "p0");
    }
}
