//! Failures: prefill retries, decode errors mid-stream, client disconnects, stage timeouts, health.

use std::sync::atomic::Ordering;

use pdserve_router::health::probe_all;

use crate::common::*;

#[tokio::test]
async fn a_failing_prefill_is_retried_on_another_instance() {
    let c = Cluster::start(Options {
        prefill: 2,
        ..Options::default()
    })
    .await;
    c.prefill[0].set_mode(PrefillMode::Fail(500));
    let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], REPLY);
    assert_eq!(headers["x-pdserve-prefill-instance"], "p1");
    assert_eq!(body["pdserve"]["generations"][0]["prefill_attempts"], 2);
    let id = c.prefill[0].requests.all()[0].request_id.clone();
    assert_eq!(
        c.prefill[1].requests.all()[0].request_id,
        id,
        "same request id on the retry"
    );
    c.prefill[0]
        .aborts
        .wait_until("abort of the failed leg", |a| a.contains(&id))
        .await;
    let metrics = c.metrics().await;
    assert!(
        metrics.contains(r#"pdserve_router_retries_total{role="prefill",reason="status_5xx"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_hanging_prefill_times_out_and_is_retried() {
    let c = Cluster::start(Options {
        prefill: 2,
        tweak: Box::new(|c| c.timeouts.prefill_ms = 300),
        ..Options::default()
    })
    .await;
    c.prefill[0].set_mode(PrefillMode::Hang);
    let (status, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-pdserve-prefill-instance"], "p1");
    let id = c.prefill[0].requests.all()[0].request_id.clone();
    c.prefill[0]
        .aborts
        .wait_until("abort of the timed-out leg", |a| a.contains(&id))
        .await;
}

#[tokio::test]
async fn exhausted_prefill_retries_fail_with_503_and_abort_decode() {
    let c = Cluster::start(Options {
        prefill: 2,
        tweak: Box::new(|c| c.retries.prefill_attempts = 2),
        ..Options::default()
    })
    .await;
    for p in &c.prefill {
        p.set_mode(PrefillMode::Fail(503));
    }
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable_error");
    assert_eq!(body["error"]["code"], "prefill_failed");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1")
    );
    let id = c.decode[0].requests.all()[0].request_id.clone();
    c.decode[0]
        .aborts
        .wait_until("decode abort", |a| a.contains(&id))
        .await;
}

#[tokio::test]
async fn an_unreachable_decode_is_retried_on_another_instance() {
    let c = Cluster::start(Options {
        decode: 2,
        ..Options::default()
    })
    .await;
    *c.decode[0].fail_open.lock() = Some(503);
    let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-pdserve-decode-instance"], "d1");
    let id = c.decode[0].requests.all()[0].request_id.clone();
    assert_eq!(c.decode[1].requests.all()[0].request_id, id);
    assert_eq!(c.prefill[0].requests.all()[0].decode.instance_id, "d1");
    c.decode[0]
        .aborts
        .wait_until("abort of the failed open", |a| a.contains(&id))
        .await;
    let metrics = c.metrics().await;
    assert!(
        metrics.contains(r#"pdserve_router_retries_total{role="decode",reason="status_5xx"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_prefill_rejection_is_not_retried() {
    let c = Cluster::start(Options {
        prefill: 2,
        ..Options::default()
    })
    .await;
    c.prefill[0].set_mode(PrefillMode::Fail(400));
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(c.prefill[1].requests.len(), 0);
}

#[tokio::test]
async fn a_decode_failure_mid_stream_ends_the_stream_with_an_error_event() {
    let c = Cluster::start(Options::default()).await;
    c.decode[0].set_script(DecodeScript {
        fail_after: Some(3),
        ..DecodeScript::default()
    });
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (status, _, payloads) = c.stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let last: serde_json::Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert_eq!(last["error"]["code"], "decode_error");
    assert!(!payloads.iter().any(|p| p == "[DONE]"));
    let text: String = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, c.text.decode(&c.reply_tokens()[..3]));
}

#[tokio::test]
async fn a_decode_failure_without_streaming_is_a_500_envelope() {
    let c = Cluster::start(Options::default()).await;
    c.decode[0].set_script(DecodeScript {
        fail_after: Some(2),
        ..DecodeScript::default()
    });
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 500);
    assert_eq!(body["error"]["message"], "the decode stage failed");
}

#[tokio::test]
async fn a_client_disconnect_aborts_both_legs() {
    let c = Cluster::start(Options::default()).await;
    let answer = Gate::new();
    let resume = Gate::new();
    c.prefill[0].set_mode(PrefillMode::HoldAnswer(answer));
    c.decode[0].set_script(DecodeScript {
        hold_at: Some((3, resume)),
        ..DecodeScript::default()
    });
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let mut response = c
        .http
        .post(format!("{}/v1/chat/completions", c.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"H") {
        seen.push_str(&String::from_utf8_lossy(
            &response.chunk().await.unwrap().unwrap(),
        ));
    }
    drop(response);
    let id = c.decode[0].requests.all()[0].request_id.clone();
    c.decode[0]
        .aborts
        .wait_until("decode abort", |a| a.contains(&id))
        .await;
    c.prefill[0]
        .aborts
        .wait_until("prefill abort", |a| a.contains(&id))
        .await;
    let metrics = c.metrics().await;
    assert!(
        metrics
            .contains(r#"pdserve_router_aborts_total{role="decode",reason="client_disconnect"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_missing_kv_transfer_is_a_504() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.timeouts.kv_transfer_ms = 200),
        ..Options::default()
    })
    .await;
    c.prefill[0].set_mode(PrefillMode::SkipKv);
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "kv_timeout");
    assert_eq!(c.decode[0].requests.all()[0].kv_timeout_ms, 200);
}

#[tokio::test]
async fn a_stalled_prefill_hits_the_first_token_timeout() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.timeouts.first_token_ms = 300),
        ..Options::default()
    })
    .await;
    c.prefill[0].set_mode(PrefillMode::Hang);
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "first_token_timeout");
    let id = c.decode[0].requests.all()[0].request_id.clone();
    c.decode[0]
        .aborts
        .wait_until("decode abort", |a| a.contains(&id))
        .await;
    c.prefill[0]
        .aborts
        .wait_until("prefill abort", |a| a.contains(&id))
        .await;
}

#[tokio::test]
async fn a_stalled_decode_hits_the_inter_token_timeout_mid_stream() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.timeouts.inter_token_ms = 300),
        ..Options::default()
    })
    .await;
    c.decode[0].set_script(DecodeScript {
        hold_at: Some((2, Gate::new())),
        ..DecodeScript::default()
    });
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (status, _, payloads) = c.stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let last: serde_json::Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "inter_token_timeout");
    assert_eq!(last["error"]["type"], "timeout_error");
    let id = c.decode[0].requests.all()[0].request_id.clone();
    c.decode[0]
        .aborts
        .wait_until("decode abort", |a| a.contains(&id))
        .await;
}

#[tokio::test]
async fn unhealthy_instances_are_skipped_and_recover() {
    let c = Cluster::start(Options {
        decode: 2,
        tweak: Box::new(|c| {
            c.health.unhealthy_after_failures = 1;
            c.health.healthy_after_successes = 1;
        }),
        ..Options::default()
    })
    .await;
    c.decode[0].healthy.store(false, Ordering::SeqCst);
    probe_all(&c.state).await;
    for _ in 0..3 {
        let (status, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-pdserve-decode-instance"], "d1");
    }
    c.decode[1].healthy.store(false, Ordering::SeqCst);
    probe_all(&c.state).await;
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "no_healthy_instance");
    let health = c
        .http
        .get(format!("{}/health", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    c.decode[0].healthy.store(true, Ordering::SeqCst);
    probe_all(&c.state).await;
    let (status, headers, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-pdserve-decode-instance"], "d0");
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_get_429() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.limits.max_concurrent_requests = 1),
        ..Options::default()
    })
    .await;
    let resume = Gate::new();
    c.decode[0].set_script(DecodeScript {
        hold_at: Some((1, resume.clone())),
        ..DecodeScript::default()
    });
    let url = format!("{}/v1/chat/completions", c.url);
    let first = tokio::spawn(c.http.post(url).json(&chat_body("Hi")).send());
    c.decode[0]
        .requests
        .wait_until("first request at decode", |r| !r.is_empty())
        .await;
    let (status, _, body) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    resume.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}
