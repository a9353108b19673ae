//! The public API on the happy path: both endpoints, streaming and not, usage, n > 1, stop
//! strings, logprobs, models, metrics.

use std::sync::Arc;

use crate::common::*;

fn chunks_json(payloads: &[String]) -> Vec<serde_json::Value> {
    payloads
        .iter()
        .filter(|p| p.as_str() != "[DONE]")
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_returns_the_reply_with_usage_and_placement() {
    let c = Cluster::start(Options::default()).await;
    let (status, headers, body) = c.post("/v1/chat/completions", chat_body("Hi there")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["logprobs"], serde_json::Value::Null);
    let prompt = c.chat_prompt_tokens("Hi there");
    let completion = c.reply_tokens().len() as u64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt);
    assert_eq!(body["usage"]["completion_tokens"], completion);
    assert_eq!(body["usage"]["total_tokens"], prompt + completion);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    let generation = &body["pdserve"]["generations"][0];
    assert_eq!(generation["prefill_instance"], "p0");
    assert_eq!(generation["decode_instance"], "d0");
    assert_eq!(generation["prefill_attempts"], 1);
    assert_eq!(generation["timings"]["transfer_s"], 0.003);
    assert!(
        generation["timings"]["e2e_s"].as_f64().unwrap()
            >= generation["timings"]["first_token_s"].as_f64().unwrap()
    );
    assert_eq!(headers["x-pdserve-prefill-instance"], "p0");
    assert_eq!(headers["x-pdserve-decode-instance"], "d0");
    assert!(
        headers["x-pdserve-timings"]
            .to_str()
            .unwrap()
            .contains("transfer_s=0.003000")
    );
    // The prompt the services saw is the chat template's rendering, the same on both legs.
    let sent = &c.prefill[0].requests.all()[0];
    assert_eq!(sent.prompt_token_ids.len() as u64, prompt);
    assert_eq!(sent.prompt_token_ids[0], 0, "BOS first");
    assert_eq!(
        c.decode[0].requests.all()[0].prompt_token_ids,
        sent.prompt_token_ids
    );
    assert_eq!(sent.decode.kv_addr, c.decode[0].kv_addr);
    assert_eq!(c.decode[0].frames.all()[0].request_id, sent.request_id);
}

#[tokio::test]
async fn chat_stream_sends_role_content_finish_usage_and_done() {
    let c = Cluster::start(Options::default()).await;
    c.decode[0].set_script(DecodeScript {
        per_event: 2,
        ..DecodeScript::default()
    });
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, headers, payloads) = c.stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-pdserve-decode-instance"], "d0");
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks = chunks_json(&payloads);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        serde_json::json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, REPLY);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some())
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], serde_json::json!([]));
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        c.reply_tokens().len()
    );
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"],
        c.chat_prompt_tokens("Hi")
    );
    assert_eq!(
        usage_chunk["pdserve"]["generations"][0]["decode_instance"],
        "d0"
    );
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
}

#[tokio::test]
async fn stream_without_usage_puts_the_extension_on_the_finish_chunk() {
    let c = Cluster::start(Options::default()).await;
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (_, _, payloads) = c.stream("/v1/chat/completions", body).await;
    let chunks = chunks_json(&payloads);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["pdserve"]["generations"][0]["prefill_instance"], "p0");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn completions_accept_text_and_token_prompts() {
    let c = Cluster::start(Options::default()).await;
    let first4 = c.text.decode(&c.reply_tokens()[..4]);
    let say_hi = c.text.encode("Say hi", true).unwrap().len() as u64;
    let bye = c.text.encode("Bye", true).unwrap().len() as u64;
    for (prompt, prompt_tokens) in [
        (serde_json::json!(["Say hi", "Bye"]), say_hi + bye),
        (serde_json::json!([[5, 6, 7], [8]]), 4),
    ] {
        let body = serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
        let (status, _, body) = c.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "text_completion");
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        for (i, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], i);
            assert_eq!(choice["text"], first4.as_str());
            assert_eq!(choice["finish_reason"], "length");
        }
        assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
        assert_eq!(body["usage"]["completion_tokens"], 8);
    }
    let prompts: Vec<_> = c.prefill[0]
        .requests
        .all()
        .into_iter()
        .map(|r| r.prompt_token_ids)
        .collect();
    assert!(prompts.contains(&vec![5, 6, 7]) && prompts.contains(&vec![8]));
    assert!(
        c.decode[0]
            .requests
            .all()
            .iter()
            .all(|r| r.stop.max_tokens == 4)
    );
}

#[tokio::test]
async fn completion_stream_concatenates_to_the_reply() {
    let c = Cluster::start(Options::default()).await;
    let body = serde_json::json!({"model": MODEL, "prompt": "x", "stream": true});
    let (status, _, payloads) = c.stream("/v1/completions", body).await;
    assert_eq!(status, 200);
    let chunks = chunks_json(&payloads);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, REPLY);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(payloads.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn n_fans_out_with_consecutive_seeds_and_merges_choices() {
    let c = Cluster::start(Options {
        decode: 2,
        ..Options::default()
    })
    .await;
    let body = with(chat_body("Hi"), serde_json::json!({"n": 3, "seed": 40}));
    let (status, headers, body) = c.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(
            choice["message"]["content"],
            format!("[{}] {REPLY}", 40 + i)
        );
    }
    let mut seeds: Vec<u64> = c.prefill[0]
        .requests
        .all()
        .iter()
        .map(|r| r.sampling.seed.unwrap())
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, vec![40, 41, 42]);
    // Round robin over two decode instances: choices alternate.
    assert_eq!(headers["x-pdserve-decode-instance"], "d0,d1,d0");
    let reports = body["pdserve"]["generations"].as_array().unwrap();
    assert_eq!(reports.len(), 3);
    let completion: u64 = (40..43)
        .map(|s| {
            c.text
                .encode(&format!("[{s}] {REPLY}"), false)
                .unwrap()
                .len() as u64
        })
        .sum();
    assert_eq!(body["usage"]["completion_tokens"], completion);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        c.chat_prompt_tokens("Hi"),
        "prompt counted once"
    );
}

#[tokio::test]
async fn n_streams_every_choice_by_index() {
    let c = Cluster::start(Options::default()).await;
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"n": 2, "seed": 7, "stream": true}),
    );
    let (_, _, payloads) = c.stream("/v1/chat/completions", body).await;
    let chunks = chunks_json(&payloads);
    for i in 0..2u64 {
        let text: String = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, format!("[{}] {REPLY}", 7 + i));
    }
    assert_eq!(
        chunks
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .count(),
        2
    );
}

#[tokio::test]
async fn a_stop_string_cuts_the_text_and_aborts_decode() {
    let c = Cluster::start(Options::default()).await;
    // Decode holds after "Hello world." forever: the router must not wait for it.
    let never = Gate::new();
    let hold_at = c.text.encode("Hello world. This", false).unwrap().len();
    c.decode[0].set_script(DecodeScript {
        hold_at: Some((hold_at, never)),
        ..DecodeScript::default()
    });
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"stop": ["world", "zzz"]}),
    );
    let (status, _, body) = c.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello ");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let through_stop = c.text.encode("Hello world", false).unwrap().len();
    assert_eq!(body["usage"]["completion_tokens"], through_stop);
    let id = c.decode[0].requests.all()[0].request_id.clone();
    c.decode[0]
        .aborts
        .wait_until("decode abort", |a| a.contains(&id))
        .await;
}

#[tokio::test]
async fn a_stop_string_split_across_stream_chunks_never_leaks() {
    let c = Cluster::start(Options::default()).await;
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"stream": true, "stop": "This is"}),
    );
    let (_, _, payloads) = c.stream("/v1/chat/completions", body).await;
    let chunks = chunks_json(&payloads);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello world. ");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn multibyte_characters_split_across_tokens_stream_whole() {
    let dir = tempfile::tempdir().unwrap();
    tokenizer::write(dir.path());
    let text = Arc::new(pdserve_router::TextProcessor::load(dir.path(), None).unwrap());
    let reply = "Crème brûlée ☃ 深度";
    let encoded = text.encode(reply, false).unwrap();
    let model: ModelFn = Arc::new(move |_| encoded.clone());
    let c = Cluster::start_with_model(Options::default(), dir, text, model).await;
    let body = with(chat_body("Hi"), serde_json::json!({"stream": true}));
    let (_, _, payloads) = c.stream("/v1/chat/completions", body).await;
    let deltas: Vec<String> = chunks_json(&payloads)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), reply);
}

#[tokio::test]
async fn logprobs_come_in_each_endpoints_format() {
    let c = Cluster::start(Options::default()).await;
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 3}),
    );
    let (status, _, body) = c.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["logprob"], -0.5);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let first = c.reply_tokens()[0];
    let (token, bytes) = c.text.token_text(first);
    assert_eq!(content[0]["token"], token.as_str());
    assert_eq!(content[0]["bytes"], serde_json::json!(bytes));
    assert_eq!(c.prefill[0].requests.all()[0].sampling.logprobs, Some(2));

    let body = serde_json::json!({"model": MODEL, "prompt": "x", "logprobs": 1, "max_tokens": 3});
    let (status, _, body) = c.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"], serde_json::json!([-0.5, -0.5, -0.5]));
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 1);
}

#[tokio::test]
async fn vllm_extensions_reach_both_services() {
    let c = Cluster::start(Options::default()).await;
    let body = with(
        chat_body("Hi"),
        serde_json::json!({"min_tokens": 2, "ignore_eos": true, "top_k": 5, "temperature": 0.5,
            "top_p": 0.9, "stop_token_ids": [9], "max_completion_tokens": 6}),
    );
    let (status, _, _) = c.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let p = &c.prefill[0].requests.all()[0];
    let d = &c.decode[0].requests.all()[0];
    for (sampling, stop) in [(&p.sampling, &p.stop), (&d.sampling, &d.stop)] {
        assert_eq!(stop.min_tokens, 2);
        assert!(stop.ignore_eos);
        assert_eq!(stop.stop_token_ids, vec![9]);
        assert_eq!(stop.max_tokens, 6);
        assert_eq!(sampling.top_k, Some(5));
        assert_eq!(sampling.temperature, 0.5);
        assert_eq!(sampling.top_p, 0.9);
    }
}

#[tokio::test]
async fn models_report_the_simulation_of_the_instances() {
    let c = Cluster::start(Options::default()).await;
    let r = c
        .http
        .get(format!("{}/v1/models", c.url))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    let card = &body["data"][0];
    assert_eq!(card["id"], MODEL);
    assert_eq!(card["object"], "model");
    assert_eq!(card["max_model_len"], 4096);
    assert_eq!(
        card["pdserve"],
        serde_json::json!({"hardware": "h800", "time_scale": 1.0, "modeled_model": "deepseek-v3", "mode": "analysis"})
    );
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_decisions() {
    let c = Cluster::start(Options::default()).await;
    let (status, _, _) = c.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(status, 200);
    let text = c.metrics().await;
    for needle in [
        r#"pdserve_router_requests_total{endpoint="chat_completions",status="200"} 1"#,
        "pdserve_router_time_to_first_token_seconds_count 1",
        "pdserve_router_e2e_request_latency_seconds_count 1",
        "pdserve_router_kv_transfer_time_seconds_count 1",
        "pdserve_router_overhead_seconds_count 1",
        r#"pdserve_router_routing_decisions_total{role="decode",instance="d0",policy="round_robin"} 1"#,
        r#"pdserve_router_instance_healthy{role="prefill",instance="p0"} 1"#,
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    let generated = format!(
        "pdserve_router_generation_tokens_total {}",
        c.reply_tokens().len()
    );
    assert!(text.contains(&generated), "{text}");
    for needle in [
        r#"pdserve_router_requests_finished_total{finished_reason="stop"} 1"#,
        r#"pdserve_router_policy_info{role="prefill",policy="round_robin"} 1"#,
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    // Every router metric of the catalog is rendered after one request, except the counters of
    // failures (retries, aborts, stage timeouts, failed generations: tests/router/failures.rs).
    use pdserve_protocol::metrics as catalog;
    let failure_only = [
        catalog::ROUTER_RETRIES_TOTAL.name,
        catalog::ROUTER_ABORTS_TOTAL.name,
        catalog::ROUTER_STAGE_TIMEOUTS_TOTAL.name,
        catalog::ROUTER_GENERATION_FAILURES_TOTAL.name,
    ];
    for def in catalog::of_component("router").filter(|d| !failure_only.contains(&d.name)) {
        let header = format!("# TYPE {} {}", def.name, def.kind.as_str());
        assert!(text.contains(&header), "missing `{header}` in\n{text}");
    }
}

#[tokio::test]
async fn health_is_ok_with_instances_up() {
    let c = Cluster::start(Options::default()).await;
    let r = c
        .http
        .get(format!("{}/health", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_project_tokenizer_renders_the_deepseek_layout_and_streams_text_back() {
    use pdserve_protocol::params::{ChatTurn, Role};
    use pdserve_router::assemble::ChoiceAssembler;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/models");
    let text = pdserve_router::TextProcessor::load(&dir, None).unwrap();
    let turn = |role, content: &str| ChatTurn {
        role,
        content: content.into(),
        name: None,
        tool_call_id: None,
    };
    let ids = text
        .encode_chat(&[turn(Role::System, "Be brief."), turn(Role::User, "Hello")])
        .unwrap();
    let bos = text.encode("<｜begin▁of▁sentence｜>", false).unwrap();
    let user = text.encode("<｜User｜>", false).unwrap();
    let assistant = text.encode("<｜Assistant｜>", false).unwrap();
    assert_eq!(
        (bos.len(), user.len(), assistant.len()),
        (1, 1, 1),
        "special tokens are single ids"
    );
    assert_eq!(ids.first(), Some(&bos[0]));
    assert_eq!(ids.last(), Some(&assistant[0]));
    assert!(ids.contains(&user[0]));
    // A reply decoded token by token comes back whole, multi-byte characters included.
    let reply = "Thou art — naïve ☃ 深度.";
    let reply_ids = text.encode(reply, false).unwrap();
    let mut assembler = ChoiceAssembler::new(&ids, vec![], 0, false);
    let mut out = String::new();
    for id in &reply_ids {
        out.push_str(&assembler.push(&text, &[*id], None, None).text);
    }
    out.push_str(&assembler.finish(&text, 100).text);
    assert_eq!(out, reply);
}
