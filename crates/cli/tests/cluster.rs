//! The deployment shape: `pdserve router|prefill|decode` as five processes from
//! config/cluster-local.toml (its ports replaced by free ones). One cluster serves every check,
//! in order: both decode instances serve; a client that disconnects mid-stream frees its KV on
//! the decode instance at once; a prefill process killed with SIGKILL has its in-flight and later
//! requests retried on the other prefill instance; a decode process killed mid-stream ends that
//! stream with an error event.

mod common;

use std::time::Duration;

use common::{Cluster, instance_stats, metric_sum, metrics_text, sse_events, wait_until};
use serde_json::{Value, json};

/// A prompt of about `words` tokens (the tiny model's tokenizer splits these into words).
fn long_prompt(words: usize) -> String {
    let verse =
        "And God saw the light , that it was good : and God divided the light from the darkness . ";
    verse
        .split_whitespace()
        .cycle()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cluster_survives_disconnects_and_killed_processes() {
    // Prefill paced ×10 (a long prompt stays in prefill long enough to be caught there); decode
    // paced ×1 (a long stream is still running when the client or the process goes away).
    let mut cluster = Cluster::start("failures", "10", "1").await;
    let (router, base) = cluster.start_router(None, &["--time-scale", "0"]).await;
    let client = reqwest::Client::new();

    both_decode_instances_serve(&client, &base).await;
    a_disconnected_client_frees_its_kv_at_once(&client, &base, &mut cluster).await;
    a_killed_prefill_process_is_retried_on_the_other(&client, &base, &mut cluster).await;
    a_killed_decode_process_ends_its_stream_with_an_error_event(&client, &base, &mut cluster).await;

    let mut router = router;
    assert!(
        router.child.try_wait().expect("try_wait").is_none(),
        "router died: {}",
        router.stderr()
    );
}

async fn both_decode_instances_serve(client: &reqwest::Client, base: &str) {
    // Round robin.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "And God said", "max_tokens": 3, "temperature": 0}))
            .send()
            .await
            .expect("completion");
        assert_eq!(r.status(), 200);
        seen.push(header(&r, "x-pdserve-decode-instance"));
    }
    seen.sort();
    assert_eq!(seen, ["d0", "d1"]);
}

async fn a_disconnected_client_frees_its_kv_at_once(
    client: &reqwest::Client,
    base: &str,
    cluster: &mut Cluster,
) {
    let mut r = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": long_prompt(150), "max_tokens": 2000, "temperature": 0,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let id = header(&r, "x-pdserve-decode-instance");
    let url = cluster.instance(&id).url.clone();
    // Wait for tokens, then check that the request holds KV on its decode instance.
    let mut body = String::new();
    while sse_events(&body).len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(60), r.chunk())
            .await
            .expect("chunks within 60 s")
            .expect("chunk read")
            .expect("a chunk before the end");
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let held = instance_stats(client, &url).await;
    let used = |s: &Value| {
        s["kv_blocks_total"].as_u64().unwrap_or(0) - s["kv_blocks_free"].as_u64().unwrap_or(0)
    };
    assert!(
        used(&held) >= 3,
        "a 150-token prompt holds ≥ 3 blocks: {held}"
    );
    assert_eq!(held["running"], 1, "{held}");
    drop(r);
    // Bounded wait: the decode instance frees the blocks and runs nothing.
    wait_until(
        Duration::from_secs(10),
        "KV freed after the disconnect",
        || {
            let url = url.clone();
            async move {
                let s = instance_stats(client, &url).await;
                used(&s) == 0 && s["running"] == 0 && s["waiting"] == 0
            }
        },
    )
    .await;
}

async fn a_killed_prefill_process_is_retried_on_the_other(
    client: &reqwest::Client,
    base: &str,
    cluster: &mut Cluster,
) {
    let p0 = cluster.instance("p0").url.clone();
    // Four long prompts at once: round robin sends two of them to p0.
    let prompt = long_prompt(600);
    let mut inflight = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = format!("{base}/v1/completions");
        let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
        inflight.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await
        }));
    }
    // Gate: p0 is computing (or queueing) a prefill; then SIGKILL it.
    wait_until(
        Duration::from_secs(60),
        "a prefill in progress on p0",
        || {
            let p0 = p0.clone();
            async move {
                let s = instance_stats(client, &p0).await;
                s["running"].as_u64().unwrap_or(0) + s["waiting"].as_u64().unwrap_or(0) > 0
            }
        },
    )
    .await;
    cluster
        .instance("p0")
        .proc
        .child
        .kill()
        .expect("SIGKILL the prefill process");
    let mut retried = 0;
    for task in inflight {
        let r = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the in-flight request ends within 120 s")
            .expect("task")
            .expect("response");
        assert_eq!(
            r.status(),
            200,
            "an in-flight request failed: {:?}",
            r.text().await
        );
        let v: Value = r.json().await.expect("JSON");
        let g = &v["pdserve"]["generations"][0];
        assert_eq!(g["prefill_instance"], "p1", "{v}");
        if g["prefill_attempts"] == 2 {
            retried += 1;
        }
    }
    assert!(retried >= 1, "no in-flight request was retried");
    // Later requests succeed too (p1 serves them, retried while p0 still looks healthy).
    for _ in 0..3 {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "And God said", "max_tokens": 2, "temperature": 0}))
            .send()
            .await
            .expect("completion");
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-pdserve-prefill-instance"), "p1");
    }
    let metrics = metrics_text(client, base).await;
    let retries = metric_sum(&metrics, "pdserve_router_retries_total", "role=\"prefill\"");
    assert!(retries >= f64::from(retried), "router metrics: {metrics}");
}

async fn a_killed_decode_process_ends_its_stream_with_an_error_event(
    client: &reqwest::Client,
    base: &str,
    cluster: &mut Cluster,
) {
    let mut r = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": "And God said", "max_tokens": 2000, "temperature": 0,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let victim = header(&r, "x-pdserve-decode-instance");
    let first = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("a first chunk within 60 s")
        .expect("chunk read")
        .expect("a chunk");
    assert!(!first.is_empty());
    cluster
        .instance(&victim)
        .proc
        .child
        .kill()
        .expect("SIGKILL the decode process");
    let mut body = String::from_utf8_lossy(&first).to_string();
    let rest = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(c)) = r.chunk().await {
            body.push_str(&String::from_utf8_lossy(&c));
        }
        body
    })
    .await
    .expect("the stream ends within 90 s of the kill");
    let events = sse_events(&rest);
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"), "{rest}");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON event");
    assert!(
        last["error"]["message"].is_string(),
        "last event is not an error: {last}"
    );
}
