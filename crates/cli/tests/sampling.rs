//! Sampling through the whole system (`pdserve up`: router → prefill → KV transfer → decode), with
//! MTP off and on: a seeded sampled request gives the text of the model run alone (`pdserve
//! generate`, one sampler drawing index k with draw k); every token carries the requested
//! `top_logprobs`; `min_tokens` keeps stop ids from ending a generation early; with MTP, the draft
//! prefill proposes after the first token is verified in decode's first step.

mod common;

use std::time::Duration;

use common::{Proc, generate, metric_sum, metrics_text, post, sse_events, wait_until};
use serde_json::{Value, json};

const PROMPT: &str = "And God said, Let there be light";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_logprobs_and_min_tokens_hold_across_prefill_and_decode() {
    for mtp in ["false", "true"] {
        let (mut up, base, dir) = Proc::up(&["--time-scale", "0", "--mtp", mtp]).await;
        let what = if mtp == "true" { "MTP on" } else { "MTP off" };
        let client = reqwest::Client::new();
        seeded_sampling_equals_the_model_alone(&client, &base, &dir, what).await;
        every_token_has_its_top_logprobs(&client, &base, what).await;
        min_tokens_outlasts_a_stop_token(&client, &base, &dir, what).await;
        if mtp == "true" {
            prefill_draft_is_verified_in_the_first_decode_step(&client, &base).await;
        }
        assert!(
            up.child.try_wait().expect("try_wait").is_none(),
            "{}",
            up.stderr()
        );
    }
}

/// Two tokens: prefill samples the first and its MTP module drafts the second; the KV frame carries
/// the draft, so decode's only step verifies one (without it, that step would have none).
async fn prefill_draft_is_verified_in_the_first_decode_step(client: &reqwest::Client, base: &str) {
    let drafts = || async {
        let text = metrics_text(client, base).await;
        let name = "pdserve_decode_spec_decode_num_drafts_total";
        metric_sum(&text, name, "instance=\"decode-0\"")
    };
    let before = drafts().await;
    for _ in 0..3 {
        let (status, v) = post(
            client,
            &format!("{base}/v1/completions"),
            &json!({"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    }
    // The counters are mirrored after the step that delivered the tokens.
    wait_until(Duration::from_secs(10), "three verified drafts", || async {
        drafts().await - before >= 3.0
    })
    .await;
    assert_eq!(
        drafts().await - before,
        3.0,
        "one verified draft per request"
    );
}

async fn seeded_sampling_equals_the_model_alone(
    client: &reqwest::Client,
    base: &str,
    dir: &str,
    what: &str,
) {
    for seed in [7u64, 4242] {
        let alone = generate(&[
            "--model",
            dir,
            "--prompt",
            PROMPT,
            "--temperature",
            "0.9",
            "--seed",
            &seed.to_string(),
            "--max-tokens",
            "16",
            "--ignore-eos",
        ]);
        let (status, v) = post(
            client,
            &format!("{base}/v1/completions"),
            &json!({"prompt": alone["prompt_tokens"], "max_tokens": 16, "temperature": 0.9,
                    "seed": seed, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"], alone["text"],
            "{what}, seed {seed}: prefill→decode vs one sampler"
        );
    }
}

async fn every_token_has_its_top_logprobs(client: &reqwest::Client, base: &str, what: &str) {
    // Chat, not streamed: each content item has `top_logprobs` of the requested length.
    let (status, v) = post(
        client,
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Who made the light?"}],
                "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no logprobs.content: {v}"));
    assert_eq!(content.len(), 8, "{what}: {v}");
    for (k, item) in content.iter().enumerate() {
        let top = item["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{what}: token {k}: {item}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], item["token"], "{what}: token {k}: {item}");
    }

    // Completions, streamed: one top map of 2 per token.
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0.7, "seed": 3,
                      "ignore_eos": true, "logprobs": 2, "stream": true}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.expect("stream body"));
    let mut tops = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).expect("chunk JSON");
        if let Some(maps) = c["choices"][0]["logprobs"]["top_logprobs"].as_array() {
            tops.extend(maps.iter().map(|m| m.as_object().map_or(0, |o| o.len())));
        }
    }
    assert_eq!(tops.len(), 6, "{what}: {events:?}");
    // A map may merge two alternatives that decode to the same text.
    assert!(
        tops.iter().all(|&n| (1..=2).contains(&n)),
        "{what}: {tops:?}"
    );
    assert!(
        tops.iter().filter(|&&n| n == 2).count() >= 4,
        "{what}: {tops:?}"
    );
}

async fn min_tokens_outlasts_a_stop_token(
    client: &reqwest::Client,
    base: &str,
    dir: &str,
    what: &str,
) {
    let alone = generate(&[
        "--model",
        dir,
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
    ]);
    let ids: Vec<u64> = alone["generated_tokens"]
        .as_array()
        .expect("generated ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    // The first token (after the first) not seen before: stopping on it ends greedy output
    // after k + 1 tokens.
    let k = (1..ids.len())
        .find(|&k| !ids[..k].contains(&ids[k]))
        .expect("a new token in 12");
    let url = format!("{base}/v1/completions");
    let body = |min_tokens: usize| {
        json!({"prompt": alone["prompt_tokens"], "max_tokens": 20, "temperature": 0,
               "stop_token_ids": [ids[k]], "min_tokens": min_tokens})
    };
    let (status, v) = post(client, &url, &body(0)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}: {v}");
    assert_eq!(v["usage"]["completion_tokens"], k as u64 + 1, "{what}: {v}");
    // min_tokens beyond the natural stop: the stop id is masked until then.
    let min = k + 6;
    let (status, v) = post(client, &url, &body(min)).await;
    assert_eq!(status, 200, "{v}");
    let n = v["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!(
        n >= min as u64,
        "{what}: {n} tokens with min_tokens {min}: {v}"
    );
    // ignore_eos runs to max_tokens.
    let (status, v) = post(
        client,
        &url,
        &json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 24, "{what}: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{what}: {v}");
}
