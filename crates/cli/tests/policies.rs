//! Routing policies on a real 2 prefill + 2 decode cluster (config/cluster-local.toml on free
//! ports, no pacing): for each policy a router is started against the same four instances and a
//! dozen concurrent requests must reach both prefill and both decode instances; cache-aware pins
//! repeated long prefixes to one prefill instance while the instances are balanced.

mod common;

use std::collections::BTreeMap;

use common::Cluster;
use serde_json::{Value, json};

/// The cluster config with both policies set to `kind` (TOML inline table body).
fn with_policy(text: &str, kind: &str) -> String {
    let out = text
        .replace(
            "[router.prefill_policy]\nkind = \"round_robin\"",
            &format!("[router.prefill_policy]\nkind = \"{kind}\""),
        )
        .replace(
            "[router.decode_policy]\nkind = \"round_robin\"",
            &format!("[router.decode_policy]\nkind = \"{kind}\""),
        );
    assert!(
        kind == "round_robin" || out != text,
        "config/cluster-local.toml no longer sets round_robin policies the way this test edits"
    );
    out
}

/// Sends `prompts` concurrently; returns the (prefill, decode) instance of each, from the
/// response extension.
async fn spread(client: &reqwest::Client, base: &str, prompts: &[String]) -> Vec<(String, String)> {
    let mut tasks = Vec::new();
    for p in prompts {
        let client = client.clone();
        let url = format!("{base}/v1/completions");
        let body = json!({"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("request");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("JSON")
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let v = t.await.expect("task");
        let g = &v["pdserve"]["generations"][0];
        out.push((
            g["prefill_instance"].as_str().unwrap_or("").to_string(),
            g["decode_instance"].as_str().unwrap_or("").to_string(),
        ));
    }
    out
}

fn counts<'a>(ids: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_spreads_load_and_cache_aware_pins_prefixes() {
    let cluster = Cluster::start("policies", "0", "0").await;
    let client = reqwest::Client::new();
    // Short prompts (under one 64-token block: no cache-aware key), all different.
    let prompts: Vec<String> = (0..12)
        .map(|i| format!("And God said, let there be light number {i}"))
        .collect();
    for kind in ["round_robin", "least_load", "power_of_two", "cache_aware"] {
        let edit = |text: &str| with_policy(text, kind);
        let (router, base) = cluster.start_router(Some(&edit), &[]).await;
        let chosen = spread(&client, &base, &prompts).await;
        let prefill = counts(chosen.iter().map(|c| &c.0));
        let decode = counts(chosen.iter().map(|c| &c.1));
        assert_eq!(
            prefill.keys().collect::<Vec<_>>(),
            ["p0", "p1"],
            "{kind}: prefill {prefill:?}"
        );
        assert_eq!(
            decode.keys().collect::<Vec<_>>(),
            ["d0", "d1"],
            "{kind}: decode {decode:?}"
        );

        if kind == "cache_aware" {
            // Repeated identical long prefixes (≥ 4 blocks), one at a time (the loads stay
            // balanced, so the imbalance guard holds): one prefill instance takes them all.
            let long = "In the beginning God created the heaven and the earth . ".repeat(40);
            let mut pinned = Vec::new();
            for i in 0..6 {
                let one = spread(&client, &base, &[format!("{long} {i}")]).await;
                pinned.push(one[0].0.clone());
            }
            assert!(
                pinned.iter().all(|p| *p == pinned[0]),
                "cache_aware spread one prefix: {pinned:?}"
            );
        }
        drop(router);
    }
}
