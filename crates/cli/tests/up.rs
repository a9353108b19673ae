//! `pdserve up` end to end: real process on a free loopback port, `time_scale = 0`, raw HTTP.
//! One process serves every check (starting the model is the expensive part).

mod common;

use common::{Proc, generate, post, sse_events};
use serde_json::{Value, json};

const PROMPT: &str = "In the beginning God created";
const MAX_TOKENS: u64 = 12;

fn assert_envelope(v: &Value, what: &str) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "{what}: no error.message in {v}");
    assert!(e["type"].is_string(), "{what}: no error.type in {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: envelope lacks param/code: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_openai_requests_through_prefill_and_decode() {
    let (mut proc_, base, dir) = Proc::up(&["--time-scale", "0"]).await;
    let client = reqwest::Client::new();

    // /v1/models reports the simulation.
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("models JSON");
    let m = &models["data"][0];
    let model = m["id"].as_str().expect("model id").to_string();
    assert_eq!(m["pdserve"]["hardware"], "h800", "{models}");
    assert_eq!(m["pdserve"]["time_scale"], 0.0, "{models}");
    assert_eq!(m["pdserve"]["modeled_model"], "deepseek-v3", "{models}");

    // Greedy completions equal the model alone (`pdserve generate`), token for token.
    let alone = generate(&[
        "--model",
        &dir,
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
    ]);
    let alone_text = alone["text"].as_str().expect("generate text");
    let prompt_ids = alone["prompt_tokens"]
        .as_array()
        .expect("prompt ids")
        .clone();
    let (status, v) = post(
        &client,
        &format!("{base}/v1/completions"),
        &json!({"model": model, "prompt": prompt_ids, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"], alone_text,
        "system vs model alone: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids.len() as u64, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], MAX_TOKENS, "{v}");
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_ids.len() as u64 + MAX_TOKENS,
        "{v}"
    );
    assert_eq!(
        v["pdserve"]["generations"][0]["prefill_instance"], "prefill-0",
        "{v}"
    );
    assert_eq!(
        v["pdserve"]["generations"][0]["decode_instance"], "decode-0",
        "{v}"
    );

    // A text prompt tokenizes like the model alone does (BOS included).
    let (status, v) = post(
        &client,
        &format!("{base}/v1/completions"),
        &json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids.len() as u64, "{v}");
    assert_eq!(v["choices"][0]["text"], alone_text, "{v}");

    // Streaming completions: the deltas concatenate to the same text, then usage, then [DONE].
    let body = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"model": model, "prompt": prompt_ids, "max_tokens": MAX_TOKENS,
                      "temperature": 0, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(body.status(), 200);
    let events = sse_events(&body.text().await.expect("stream body"));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, alone_text, "{events:?}");
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage["completion_tokens"], MAX_TOKENS, "{events:?}");

    // Chat, non-streaming and streaming, agree with each other and with `generate --chat`.
    let chat_alone = generate(&[
        "--model",
        &dir,
        "--prompt",
        "Who made the light?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "10",
        "--ignore-eos",
    ]);
    let chat_body = json!({"model": model, "messages": [{"role": "user", "content": "Who made the light?"}],
                           "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (status, v) = post(&client, &format!("{base}/v1/chat/completions"), &chat_body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert_eq!(content, chat_alone["text"], "chat vs generate --chat: {v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["usage"]["prompt_tokens"],
        chat_alone["prompt_tokens"].as_array().expect("ids").len() as u64,
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 10, "{v}");
    let mut stream_body = chat_body.clone();
    stream_body["stream"] = json!(true);
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&stream_body)
        .send()
        .await
        .expect("chat stream");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "{:?}",
        r.headers()
    );
    let events = sse_events(&r.text().await.expect("chat stream body"));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let deltas: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk JSON"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(deltas, content);

    // Bad input: the OpenAI envelope with the right status.
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .expect("malformed");
    assert_eq!(r.status(), 400);
    assert_envelope(&r.json().await.expect("envelope"), "malformed JSON");
    let (status, v) = post(
        &client,
        &format!("{base}/v1/chat/completions"),
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_envelope(&v, "unknown model");
    assert_eq!(v["error"]["code"], "model_not_found");
    let huge = "x".repeat(5 * 1024 * 1024);
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": model, "prompt": huge}))
        .send()
        .await
        .expect("huge");
    assert_eq!(r.status(), 413);
    assert_envelope(&r.json().await.expect("envelope"), "body over limit");

    // Still alive after all of it.
    assert!(
        proc_.child.try_wait().expect("try_wait").is_none(),
        "{}",
        proc_.stderr()
    );
}

/// The one pacing check: at `time_scale = 2` the prefill leg is released no earlier than twice its
/// simulated duration (both figures from the same response), and `/v1/models` reports the scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_paces_the_prefill_leg_by_the_time_scale() {
    let (_proc, base, _dir) = Proc::up(&["--time-scale", "2", "--hardware", "h100"]).await;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("models JSON");
    assert_eq!(models["data"][0]["pdserve"]["time_scale"], 2.0, "{models}");
    assert_eq!(models["data"][0]["pdserve"]["hardware"], "h100", "{models}");
    let (status, v) = post(
        &client,
        &format!("{base}/v1/completions"),
        &json!({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let t = &v["pdserve"]["generations"][0]["timings"];
    let simulated = t["simulated_prefill_s"]
        .as_f64()
        .expect("simulated_prefill_s");
    let wall = t["prefill_s"].as_f64().expect("prefill_s");
    assert!(simulated > 0.0, "{t}");
    assert!(
        wall >= 2.0 * simulated * 0.999,
        "prefill took {wall} s, below 2 × its simulated {simulated} s: {t}"
    );
}
