//! Failures of a whole prefill/decode pair: a KV push that fails before decode's first token is
//! retried with a fresh decode registration; pairs with differing KV layer counts are never used.

use pdserve_protocol::internal::DecodeErrorKind;
use pdserve_router::health::probe_all;

use crate::common::*;

fn content(payloads: &[String]) -> String {
    payloads
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[tokio::test]
async fn a_kv_failure_before_the_first_token_retries_the_pair_on_another_prefill() {
    let c = Cluster::start(Options {
        prefill: 2,
        ..Options::default()
    })
    .await;
    *c.decode[0].kv_invalid_next.lock() = 1;
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (status, headers, payloads) = c.stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{payloads:?}"
    );
    assert!(
        !payloads.iter().any(|p| p.contains("\"error\"")),
        "{payloads:?}"
    );
    assert_eq!(content(&payloads), REPLY);
    assert_eq!(headers["x-pdserve-prefill-instance"], "p1");
    let id = c.prefill[0].requests.all()[0].request_id.clone();
    let retry_id = format!("{id}.2");
    assert_eq!(c.prefill[1].requests.all()[0].request_id, retry_id);
    let registrations: Vec<String> = c.decode[0]
        .requests
        .all()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(
        registrations,
        [id.clone(), retry_id],
        "a fresh decode registration"
    );
    c.decode[0]
        .aborts
        .wait_until("abort of the failed registration", |a| a.contains(&id))
        .await;
    let metrics = c.metrics().await;
    assert!(
        metrics.contains(r#"pdserve_router_retries_total{role="prefill",reason="kv_invalid"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_non_streaming_request_reports_both_attempts_after_a_pair_retry() {
    let c = Cluster::start(Options {
        prefill: 2,
        decode: 2,
        ..Options::default()
    })
    .await;
    *c.decode[0].kv_invalid_next.lock() = 1;
    let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], REPLY);
    assert_eq!(body["pdserve"]["generations"][0]["prefill_attempts"], 2);
    assert_eq!(headers["x-pdserve-prefill-instance"], "p1");
    // The fresh registration is where the policy puts it, and the retried prefill pushes there.
    let decode = headers["x-pdserve-decode-instance"].to_str().unwrap();
    assert_eq!(c.prefill[1].requests.all()[0].decode.instance_id, decode);
    let registrations = c.decode[0].requests.len() + c.decode[1].requests.len();
    assert_eq!(registrations, 2);
}

#[tokio::test]
async fn a_kv_failure_after_tokens_were_streamed_is_not_retried() {
    let c = Cluster::start(Options {
        prefill: 2,
        ..Options::default()
    })
    .await;
    c.decode[0].set_script(DecodeScript {
        fail_after: Some(1),
        fail_kind: Some(DecodeErrorKind::KvInvalid),
        ..DecodeScript::default()
    });
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (status, _, payloads) = c.stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let last: serde_json::Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "kv_invalid");
    assert!(!payloads.iter().any(|p| p == "[DONE]"));
    assert_eq!(content(&payloads), c.text.decode(&c.reply_tokens()[..1]));
    assert_eq!(c.decode[0].requests.len(), 1);
    assert_eq!(c.prefill[1].requests.len(), 0);
    let metrics = c.metrics().await;
    assert!(
        !metrics.contains(r#"pdserve_router_retries_total{role="prefill""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn pair_retries_stop_at_the_prefill_budget() {
    let c = Cluster::start(Options {
        prefill: 2,
        tweak: Box::new(|c| c.retries.prefill_attempts = 2),
        ..Options::default()
    })
    .await;
    *c.decode[0].kv_invalid_next.lock() = 5;
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "kv_invalid");
    assert_eq!(c.decode[0].requests.len(), 2);
    let id = c.decode[0].requests.all()[0].request_id.clone();
    let retry_id = format!("{id}.2");
    c.decode[0]
        .aborts
        .wait_until("both registrations aborted", |a| {
            a.contains(&id) && a.contains(&retry_id)
        })
        .await;
    let metrics = c.metrics().await;
    assert!(
        metrics.contains(r#"pdserve_router_retries_total{role="prefill",reason="kv_invalid"} 1"#),
        "{metrics}"
    );
}

fn set_layers(stats: &parking_lot::Mutex<pdserve_protocol::internal::InstanceStats>, n: u32) {
    stats.lock().kv_layers = Some(n);
}

#[tokio::test]
async fn a_kv_layer_mismatch_makes_the_pair_unusable_with_a_503() {
    let c = Cluster::start(Options::default()).await;
    set_layers(&c.prefill[0].stats, 6);
    set_layers(&c.decode[0].stats, 5);
    probe_all(&c.state).await;
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable_error");
    assert_eq!(body["error"]["code"], "kv_layout_mismatch");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("prefill instance p0 exports 6 KV layers")
            && message.contains("decode instance d0 expects 5"),
        "{message}"
    );
    assert_eq!(
        c.decode[0].requests.len(),
        0,
        "no registration on an unusable pair"
    );
    assert_eq!(c.prefill[0].requests.len(), 0);
    set_layers(&c.decode[0].stats, 6);
    probe_all(&c.state).await;
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn mismatched_instances_are_skipped_while_a_matching_pair_exists() {
    let c = Cluster::start(Options {
        prefill: 2,
        decode: 2,
        ..Options::default()
    })
    .await;
    // Two usable pairs: p0/d0 (2 layers, the fakes' default) and p1/d1 (3 layers).
    set_layers(&c.prefill[0].stats, 2);
    set_layers(&c.prefill[1].stats, 3);
    set_layers(&c.decode[1].stats, 3);
    probe_all(&c.state).await;
    for _ in 0..4 {
        let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(status, 200, "{body}");
        let pair = (
            headers["x-pdserve-prefill-instance"]
                .to_str()
                .unwrap()
                .to_string(),
            headers["x-pdserve-decode-instance"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        assert!(
            pair == ("p0".into(), "d0".into()) || pair == ("p1".into(), "d1".into()),
            "{pair:?}"
        );
    }
    // With p1 gone, d1 has no prefill that can feed it: everything goes to p0/d0.
    c.prefill[1]
        .healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        probe_all(&c.state).await;
    }
    for _ in 0..3 {
        let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-pdserve-decode-instance"], "d0");
        assert_eq!(headers["x-pdserve-prefill-instance"], "p0");
    }
}
