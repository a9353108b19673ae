//! Bad input: every rejection is the OpenAI envelope with the right status and `param`.

use axum::body::Body;
use axum::http::Request;

use crate::common::*;

async fn reject(c: &Cluster, path: &str, body: impl Into<Body>) -> (u16, serde_json::Value) {
    let (status, _, json) = c.oneshot(json_request(path, body)).await;
    assert!(
        json["error"]["message"].is_string(),
        "not an envelope: {json}"
    );
    assert!(
        json["error"].get("param").is_some() && json["error"].get("code").is_some(),
        "{json}"
    );
    (status, json)
}

#[tokio::test]
async fn malformed_requests_are_400_envelopes_naming_the_param() {
    let c = Cluster::start(Options::default()).await;
    let chat = "/v1/chat/completions";
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{\"messages\": [".to_string(), None),
        (r#"{"messages": "hi"}"#.to_string(), Some("messages")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}"#.to_string(), Some("temperature")),
        (r#"{"messages": []}"#.to_string(), Some("messages")),
        (r#"{"messages": [{"role": "robot", "content": "x"}]}"#.to_string(), Some("messages[0].role")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#.to_string(), Some("max_tokens")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#.to_string(), Some("max_tokens")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}"#.to_string(), Some("max_tokens")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "n": 17}"#.to_string(), Some("n")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}"#.to_string(), Some("stop")),
        (r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30, "logprobs": true}"#.to_string(), Some("top_logprobs")),
    ];
    for (body, param) in cases {
        let (status, json) = reject(&c, chat, body.clone()).await;
        assert_eq!(status, 400, "{body} → {json}");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"].as_str(), param, "{body} → {json}");
    }
    assert_eq!(
        c.prefill[0].requests.len(),
        0,
        "nothing reached the instances"
    );
}

#[tokio::test]
async fn invalid_utf8_is_a_400_envelope() {
    let c = Cluster::start(Options::default()).await;
    let mut body = br#"{"messages": [{"role": "user", "content": ""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}]}"#);
    let (status, json) = reject(&c, "/v1/chat/completions", body).await;
    assert_eq!(status, 400);
    assert!(json["error"]["message"].as_str().unwrap().contains("UTF-8"));
}

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    let c = Cluster::start(Options::default()).await;
    let body =
        serde_json::json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]});
    let (status, json) = reject(&c, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(status, 404);
    assert_eq!(json["error"]["code"], "model_not_found");
    let body = serde_json::json!({"model": "gpt-9", "prompt": "x"});
    let (status, _) = reject(&c, "/v1/completions", body.to_string()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.limits.max_body_bytes = 512),
        ..Options::default()
    })
    .await;
    let body = chat_body(&"x".repeat(1000)).to_string();
    let (status, json) = reject(&c, "/v1/chat/completions", body).await;
    assert_eq!(status, 413);
    assert_eq!(json["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn unknown_fields_are_accepted_and_ignored() {
    let c = Cluster::start(Options::default()).await;
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"user": "u1", "metadata": {"k": "v"}, "frobnicate": 3}),
    );
    let (status, _, json) = c
        .oneshot(json_request("/v1/chat/completions", body.to_string()))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["choices"][0]["message"]["content"], REPLY);
}

#[tokio::test]
async fn unsupported_completion_features_are_rejected_clearly() {
    let c = Cluster::start(Options::default()).await;
    let body = serde_json::json!({"prompt": "x", "echo": true});
    let (status, json) = reject(&c, "/v1/completions", body.to_string()).await;
    assert_eq!(
        (status, json["error"]["param"].as_str()),
        (400, Some("echo"))
    );
    let body = serde_json::json!({"prompt": [1, 999999]});
    let (status, json) = reject(&c, "/v1/completions", body.to_string()).await;
    assert_eq!(
        (status, json["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
}

#[tokio::test]
async fn api_keys_guard_the_v1_routes_only() {
    let c = Cluster::start(Options {
        tweak: Box::new(|c| c.api_keys = vec!["sekret".into()]),
        ..Options::default()
    })
    .await;
    let (status, _, json) = c
        .oneshot(json_request(
            "/v1/chat/completions",
            chat_body("Hi").to_string(),
        ))
        .await;
    assert_eq!(status, 401);
    assert_eq!(json["error"]["type"], "authentication_error");
    let wrong = Request::post("/v1/chat/completions")
        .header("authorization", "Bearer nope")
        .body(Body::from(chat_body("Hi").to_string()))
        .unwrap();
    assert_eq!(c.oneshot(wrong).await.0, 401);
    let right = Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sekret")
        .body(Body::from(chat_body("Hi").to_string()))
        .unwrap();
    assert_eq!(c.oneshot(right).await.0, 200);
    let models = Request::get("/v1/models").body(Body::empty()).unwrap();
    assert_eq!(c.oneshot(models).await.0, 401);
    let health = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(c.oneshot(health).await.0, 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_envelopes() {
    let c = Cluster::start(Options::default()).await;
    let (status, _, json) = c
        .oneshot(Request::get("/v2/nothing").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 404);
    assert_eq!(json["error"]["code"], "not_found");
    let (status, _, json) = c
        .oneshot(
            Request::get("/v1/chat/completions")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 405);
    assert!(json["error"]["message"].is_string());
}
