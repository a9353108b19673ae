use super::*;
use crate::error::{ErrorKind, decode_json};

fn chat(json: serde_json::Value) -> Result<ValidatedChat, ApiError> {
    let req: ChatCompletionRequest = decode_json(json.to_string().as_bytes())?;
    validate_chat(&req, &Limits::default())
}

fn completion(json: serde_json::Value) -> Result<ValidatedCompletion, ApiError> {
    let req: CompletionRequest = decode_json(json.to_string().as_bytes())?;
    validate_completion(&req, &Limits::default())
}

fn param_of(r: Result<impl std::fmt::Debug, ApiError>) -> String {
    let e = r.expect_err("expected a validation error");
    assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e:?}");
    e.param.unwrap_or_default()
}

fn hello() -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": "hi"}])
}

#[test]
fn defaults_are_openai_defaults() {
    let v = chat(serde_json::json!({"model": "m", "messages": hello()})).unwrap();
    assert_eq!(v.params.sampling, SamplingParams::default());
    assert_eq!(v.params.n, 1);
    assert!(!v.params.stream);
    assert_eq!(v.params.max_tokens, None);
    assert_eq!(v.messages[0].role, Role::User);
}

#[test]
fn unknown_fields_are_accepted() {
    let v = chat(serde_json::json!({"messages": hello(), "user": "x", "whatever": {"a": 1}}));
    assert!(v.is_ok());
}

#[test]
fn out_of_range_fields_name_their_param() {
    let cases = [
        (serde_json::json!({"temperature": 2.5}), "temperature"),
        (serde_json::json!({"temperature": -0.1}), "temperature"),
        (serde_json::json!({"top_p": 0.0}), "top_p"),
        (serde_json::json!({"top_p": 1.5}), "top_p"),
        (serde_json::json!({"top_k": -2}), "top_k"),
        (serde_json::json!({"n": 0}), "n"),
        (serde_json::json!({"n": 17}), "n"),
        (serde_json::json!({"max_tokens": 0}), "max_tokens"),
        (
            serde_json::json!({"max_completion_tokens": -3}),
            "max_completion_tokens",
        ),
        (
            serde_json::json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (serde_json::json!({"top_logprobs": 2}), "top_logprobs"),
        (
            serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (serde_json::json!({"stop": ""}), "stop"),
        (serde_json::json!({"min_tokens": -1}), "min_tokens"),
        (
            serde_json::json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            serde_json::json!({"presence_penalty": 0.5}),
            "presence_penalty",
        ),
        (serde_json::json!({"logit_bias": {"1": 5}}), "logit_bias"),
        (
            serde_json::json!({"tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            serde_json::json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (serde_json::json!({"temperature": "hot"}), "temperature"),
    ];
    for (extra, param) in cases {
        let mut body = serde_json::json!({"messages": hello()});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        assert_eq!(param_of(chat(body.clone())), param, "body {body}");
    }
}

#[test]
fn top_k_minus_one_and_zero_mean_off() {
    for k in [-1, 0] {
        let v = chat(serde_json::json!({"messages": hello(), "top_k": k})).unwrap();
        assert_eq!(v.params.sampling.top_k, None);
    }
    let v = chat(serde_json::json!({"messages": hello(), "top_k": 5})).unwrap();
    assert_eq!(v.params.sampling.top_k, Some(5));
}

#[test]
fn empty_messages_and_unknown_roles_are_rejected() {
    assert_eq!(
        param_of(chat(serde_json::json!({"messages": []}))),
        "messages"
    );
    assert_eq!(param_of(chat(serde_json::json!({}))), "messages");
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]});
    assert_eq!(param_of(chat(body)), "messages[1].role");
}

#[test]
fn content_parts_are_joined_and_non_text_parts_rejected() {
    let body = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
    assert_eq!(chat(body).unwrap().messages[0].content, "a\nb");
    let body = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]});
    assert_eq!(param_of(chat(body)), "messages[0].content[0].type");
    let body = serde_json::json!({"messages": [{"role": "user", "content": 5}]});
    assert_eq!(param_of(chat(body)), "messages[0].content");
}

#[test]
fn developer_is_presented_as_system_and_assistant_may_lack_content() {
    let body = serde_json::json!({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": null},
        {"role": "tool", "content": "r", "tool_call_id": "c1"}]});
    let v = chat(body).unwrap();
    assert_eq!(v.messages[0].role.template_name(), "system");
    assert_eq!(v.messages[2].content, "");
    assert_eq!(v.messages[3].tool_call_id.as_deref(), Some("c1"));
    let body = serde_json::json!({"messages": [{"role": "user"}]});
    assert_eq!(param_of(chat(body)), "messages[0].content");
}

#[test]
fn chat_logprobs_become_top_n() {
    let v = chat(serde_json::json!({"messages": hello(), "logprobs": true, "top_logprobs": 3}));
    assert_eq!(v.unwrap().params.sampling.logprobs, Some(3));
    let v = chat(serde_json::json!({"messages": hello(), "logprobs": true}));
    assert_eq!(v.unwrap().params.sampling.logprobs, Some(0));
    let v = chat(serde_json::json!({"messages": hello(), "logprobs": false}));
    assert_eq!(v.unwrap().params.sampling.logprobs, None);
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let v = chat(serde_json::json!({"messages": hello(), "max_tokens": 5,
        "max_completion_tokens": 7}))
    .unwrap();
    assert_eq!(v.params.max_tokens, Some(7));
    assert_eq!(v.params.max_tokens_param, "max_completion_tokens");
}

#[test]
fn stop_params_fill_the_context_when_max_tokens_is_absent() {
    let limits = Limits {
        max_context_tokens: 100,
        ..Limits::default()
    };
    let v = chat(serde_json::json!({"messages": hello()})).unwrap();
    assert_eq!(
        v.params
            .stop_params(30, &limits, "messages")
            .unwrap()
            .max_tokens,
        70
    );
}

#[test]
fn stop_params_reject_budgets_beyond_the_context() {
    let limits = Limits {
        max_context_tokens: 100,
        ..Limits::default()
    };
    let v = chat(serde_json::json!({"messages": hello(), "max_tokens": 71})).unwrap();
    let e = v.params.stop_params(30, &limits, "messages").unwrap_err();
    assert_eq!(e.param.as_deref(), Some("max_tokens"));
    assert!(e.message.contains("at most 70"), "{}", e.message);
    let v = chat(serde_json::json!({"messages": hello(), "max_tokens": 70})).unwrap();
    assert_eq!(
        v.params
            .stop_params(30, &limits, "messages")
            .unwrap()
            .max_tokens,
        70
    );
    let e = v.params.stop_params(100, &limits, "messages").unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"));
    let e = v.params.stop_params(0, &limits, "prompt").unwrap_err();
    assert_eq!(e.param.as_deref(), Some("prompt"));
}

#[test]
fn min_tokens_may_not_exceed_the_budget() {
    let v = chat(serde_json::json!({"messages": hello(), "max_tokens": 4, "min_tokens": 5}));
    let e = v
        .unwrap()
        .params
        .stop_params(3, &Limits::default(), "messages")
        .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("min_tokens"));
}

#[test]
fn completion_prompts_in_every_shape() {
    let shapes = [
        (serde_json::json!("hi"), vec![Prompt::Text("hi".into())]),
        (
            serde_json::json!(["a", "b"]),
            vec![Prompt::Text("a".into()), Prompt::Text("b".into())],
        ),
        (
            serde_json::json!([1, 2, 3]),
            vec![Prompt::Tokens(vec![1, 2, 3])],
        ),
        (
            serde_json::json!([[1], [2, 3]]),
            vec![Prompt::Tokens(vec![1]), Prompt::Tokens(vec![2, 3])],
        ),
    ];
    for (prompt, expected) in shapes {
        let v = completion(serde_json::json!({"prompt": prompt})).unwrap();
        assert_eq!(v.prompts, expected);
    }
    assert_eq!(
        param_of(completion(serde_json::json!({"prompt": []}))),
        "prompt"
    );
    assert_eq!(param_of(completion(serde_json::json!({}))), "prompt");
    assert_eq!(
        param_of(completion(serde_json::json!({"prompt": [-1]}))),
        "prompt"
    );
}

#[test]
fn completion_rejects_unsupported_fields_clearly() {
    let e = completion(serde_json::json!({"prompt": "x", "echo": true})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("echo"));
    assert!(e.message.contains("not supported"));
    assert_eq!(
        param_of(completion(serde_json::json!({"prompt": "x", "best_of": 3}))),
        "best_of"
    );
    assert_eq!(
        param_of(completion(
            serde_json::json!({"prompt": "x", "suffix": "y"})
        )),
        "suffix"
    );
    assert!(completion(serde_json::json!({"prompt": "x", "echo": false, "best_of": 1})).is_ok());
}

#[test]
fn completion_logprobs_is_top_n() {
    let v = completion(serde_json::json!({"prompt": "x", "logprobs": 2})).unwrap();
    assert_eq!(v.params.sampling.logprobs, Some(2));
    assert_eq!(
        param_of(completion(
            serde_json::json!({"prompt": "x", "logprobs": 21})
        )),
        "logprobs"
    );
}

#[test]
fn choices_over_all_prompts_are_limited() {
    let body = serde_json::json!({"prompt": ["a", "b", "c"], "n": 6});
    assert_eq!(param_of(completion(body)), "n");
}

#[test]
fn seeds_advance_per_choice() {
    let s = SamplingParams {
        seed: Some(u64::MAX),
        ..SamplingParams::default()
    };
    assert_eq!(s.for_choice(0).seed, Some(u64::MAX));
    assert_eq!(s.for_choice(1).seed, Some(0));
    assert_eq!(SamplingParams::default().for_choice(3).seed, None);
}
