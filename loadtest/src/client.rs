//! The OpenAI HTTP client side: request bodies ([`BodyTemplate`]), one streaming request
//! ([`stream_request`]) and server discovery ([`fetch_server_info`]).
//!
//! Timing rule: each network read is stamped when it arrives, on the run's monotonic clock, before
//! its SSE events are parsed, so parsing cost never shifts a timestamp. Every transport outcome is
//! classified here, once, into a [`Failure`].

use crate::dataset::RequestSpec;
use crate::record::{Failure, FailureKind};
use crate::sse::SseDecoder;
use crate::stream::{StreamAccumulator, StreamOutcome, TokenCounter};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

/// Which OpenAI API the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/chat/completions`: the prompt is one user message.
    Chat,
    /// `/v1/completions`: the prompt is sent as `prompt`.
    Completions,
}

impl ApiKind {
    /// The name vLLM's `--backend` uses for it (`openai-chat` / `openai`).
    pub fn backend_name(self) -> &'static str {
        match self {
            Self::Chat => "openai-chat",
            Self::Completions => "openai",
        }
    }
}

/// Everything in a request body except the prompt and its length.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyTemplate {
    /// API shape.
    pub api: ApiKind,
    /// `model`.
    pub model: String,
    /// Send `ignore_eos: true` and `min_tokens = max_tokens` so outputs run to their length.
    pub ignore_eos: bool,
    /// Ask for cumulative usage on every chunk (`stream_options.continuous_usage_stats`).
    pub continuous_usage_stats: bool,
    /// `--logprobs N`: request token logprobs (`N` alternatives), which also give exact tokens per
    /// chunk.
    pub logprobs: Option<u32>,
    /// Sampling fields (`temperature`, `top_p`, `top_k`), set only when given.
    pub sampling: Map<String, Value>,
    /// `--extra-body`, merged last (it wins).
    pub extra_body: Map<String, Value>,
}

impl BodyTemplate {
    /// The JSON body for one request. Pure.
    pub fn build(&self, spec: &RequestSpec) -> Value {
        let mut stream_options = json!({"include_usage": true});
        if self.continuous_usage_stats {
            stream_options["continuous_usage_stats"] = json!(true);
        }
        let mut body =
            json!({"model": self.model, "stream": true, "stream_options": stream_options});
        match self.api {
            ApiKind::Chat => {
                body["messages"] = json!([{"role": "user", "content": spec.prompt}]);
                body["max_completion_tokens"] = json!(spec.max_tokens);
            }
            ApiKind::Completions => {
                body["prompt"] = json!(spec.prompt);
                body["max_tokens"] = json!(spec.max_tokens);
            }
        }
        match (self.logprobs, self.api) {
            (Some(n), ApiKind::Chat) => {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(n);
            }
            (Some(n), ApiKind::Completions) => body["logprobs"] = json!(n),
            (None, _) => {}
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
            body["min_tokens"] = json!(spec.max_tokens);
        }
        if let Some(obj) = body.as_object_mut() {
            for (k, v) in self.sampling.iter().chain(self.extra_body.iter()) {
                obj.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

/// How one request ended, with the send time it actually had.
#[derive(Debug)]
pub struct Exchange {
    /// Seconds from the run start when the request was handed to the connection pool.
    pub sent_s: f64,
    /// Seconds from the run start when the response ended.
    pub end_s: f64,
    /// Chunks, tokens and failure.
    pub outcome: StreamOutcome,
}

fn classify(err: &reqwest::Error, started_body: bool) -> Failure {
    let kind = if err.is_timeout() {
        FailureKind::Timeout
    } else if started_body {
        FailureKind::Incomplete
    } else {
        FailureKind::Connect
    };
    Failure {
        kind,
        status: None,
        message: err.to_string(),
    }
}

fn timeout_failure(timeout_s: f64) -> Failure {
    Failure {
        kind: FailureKind::Timeout,
        status: None,
        message: format!("no response within --request-timeout {timeout_s} s"),
    }
}

/// The `error.message` of an OpenAI error envelope, else the body itself (truncated).
fn error_envelope_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| text.chars().take(300).collect())
}

/// What the client needs to send one request.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// Shared connection pool.
    pub client: &'a reqwest::Client,
    /// Full endpoint URL.
    pub url: &'a str,
    /// The run's clock origin.
    pub t0: Instant,
    /// Per-request limit, seconds.
    pub timeout_s: f64,
}

/// Sends one streaming request and reads its response to the end (or the deadline).
pub async fn stream_request(
    call: Call<'_>,
    body: &Value,
    tokenizer: Option<&dyn TokenCounter>,
) -> Exchange {
    let now_s = |t0: Instant| t0.elapsed().as_secs_f64();
    let sent_s = now_s(call.t0);
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(call.timeout_s.max(0.0));
    let mut acc = StreamAccumulator::new();
    let response =
        tokio::time::timeout_at(deadline, call.client.post(call.url).json(body).send()).await;
    match response {
        Err(_) => acc.fail(timeout_failure(call.timeout_s)),
        Ok(Err(e)) => acc.fail(classify(&e, false)),
        Ok(Ok(resp)) if !resp.status().is_success() => {
            let status = resp.status().as_u16();
            let body = tokio::time::timeout_at(deadline, resp.bytes()).await;
            let message = match body {
                Ok(Ok(b)) => error_envelope_message(&b),
                _ => String::new(),
            };
            acc.fail(Failure {
                kind: FailureKind::Http,
                status: Some(status),
                message,
            });
        }
        Ok(Ok(resp)) => {
            let mut bytes = resp.bytes_stream();
            let mut decoder = SseDecoder::new();
            loop {
                match tokio::time::timeout_at(deadline, bytes.next()).await {
                    Err(_) => {
                        acc.fail(timeout_failure(call.timeout_s));
                        break;
                    }
                    Ok(None) => {
                        if let Some(last) = decoder.finish() {
                            acc.on_payload(now_s(call.t0), &last);
                        }
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        acc.fail(classify(&e, true));
                        break;
                    }
                    Ok(Some(Ok(chunk))) => {
                        let at_s = now_s(call.t0);
                        for payload in decoder.push(&chunk) {
                            acc.on_payload(at_s, &payload);
                        }
                        if acc.is_finished() {
                            break;
                        }
                    }
                }
            }
        }
    }
    let end_s = now_s(call.t0);
    Exchange {
        sent_s,
        end_s,
        outcome: acc.finish(tokenizer),
    }
}

/// What `/v1/models` says about the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// `data[0].id` (or the entry matching `--model`).
    pub model_id: Option<String>,
    /// pdserve's `time_scale` (wall seconds per simulated second), if reported.
    pub time_scale: Option<f64>,
    /// pdserve's simulated hardware profile name, if reported.
    pub hardware: Option<String>,
    /// pdserve's modeled model (whose shape the timing models), if reported.
    pub modeled_model: Option<String>,
    /// pdserve's fabric mode (`analysis` / `detailed`), if reported.
    pub sim_mode: Option<String>,
}

/// Reads model id and pdserve extensions from a `/v1/models` body. `time_scale` is taken from
/// the model object's `pdserve.time_scale`, else from a top-level `time_scale`.
pub fn parse_models(body: &Value, wanted_model: Option<&str>) -> ServerInfo {
    let models = body
        .get("data")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let chosen = wanted_model
        .and_then(|m| {
            models
                .iter()
                .find(|o| o.get("id").and_then(Value::as_str) == Some(m))
        })
        .or_else(|| models.first());
    let ext = chosen.and_then(|o| o.get("pdserve"));
    let time_scale = ext
        .and_then(|e| e.get("time_scale"))
        .or_else(|| body.get("time_scale"))
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0);
    let ext_str = |key: &str| {
        ext.and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ServerInfo {
        model_id: chosen
            .and_then(|o| o.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        time_scale,
        hardware: ext_str("hardware"),
        modeled_model: ext_str("modeled_model"),
        sim_mode: ext_str("mode"),
    }
}

/// A server that could not be asked what it serves.
#[derive(Debug, thiserror::Error)]
#[error("GET {url} failed: {message}")]
pub struct DiscoveryError {
    /// The `/v1/models` URL.
    pub url: String,
    /// Transport error, status or body problem.
    pub message: String,
}

/// `GET {base_url}/v1/models`.
pub async fn fetch_server_info(
    client: &reqwest::Client,
    base_url: &str,
    wanted_model: Option<&str>,
) -> Result<ServerInfo, DiscoveryError> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let fail = |message: String| DiscoveryError {
        url: url.clone(),
        message,
    };
    let resp = client
        .get(&url)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("status {}", resp.status())));
    }
    let body: Value = resp.json().await.map_err(|e| fail(e.to_string()))?;
    Ok(parse_models(&body, wanted_model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RequestSpec {
        RequestSpec {
            prompt: "hello".into(),
            prompt_tokens_estimate: 1,
            max_tokens: 8,
        }
    }

    fn template(api: ApiKind) -> BodyTemplate {
        BodyTemplate {
            api,
            model: "m".into(),
            ignore_eos: true,
            continuous_usage_stats: false,
            logprobs: None,
            sampling: Map::new(),
            extra_body: Map::new(),
        }
    }

    #[test]
    fn chat_body_has_messages_usage_and_length_control() {
        let b = template(ApiKind::Chat).build(&spec());
        assert_eq!(b["messages"][0]["content"], "hello");
        assert_eq!(b["max_completion_tokens"], 8);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["min_tokens"], 8);
        assert!(b.get("logprobs").is_none());
    }

    #[test]
    fn logprobs_use_each_apis_spelling() {
        let mut t = template(ApiKind::Chat);
        t.logprobs = Some(2);
        let b = t.build(&spec());
        assert_eq!(
            (b["logprobs"].clone(), b["top_logprobs"].clone()),
            (json!(true), json!(2))
        );
        t.api = ApiKind::Completions;
        assert_eq!(t.build(&spec())["logprobs"], 2);
    }

    #[test]
    fn completions_body_without_ignore_eos_and_extra_body_wins() {
        let mut t = template(ApiKind::Completions);
        t.ignore_eos = false;
        t.extra_body.insert("max_tokens".into(), json!(3));
        t.sampling.insert("temperature".into(), json!(0.0));
        let b = t.build(&spec());
        assert_eq!(b["prompt"], "hello");
        assert_eq!(b["max_tokens"], 3);
        assert_eq!(b["temperature"], 0.0);
        assert!(b.get("ignore_eos").is_none() && b.get("min_tokens").is_none());
    }

    #[test]
    fn time_scale_is_read_from_pdserve_extension_or_top_level() {
        let body = json!({"object":"list","data":[
            {"id":"a","object":"model"},
            {"id":"b","object":"model","pdserve":{"hardware":"h800","time_scale":4.0,
             "modeled_model":"deepseek-v3","mode":"detailed"}}]});
        let info = parse_models(&body, Some("b"));
        assert_eq!(info.time_scale, Some(4.0));
        assert_eq!(info.hardware.as_deref(), Some("h800"));
        assert_eq!(info.modeled_model.as_deref(), Some("deepseek-v3"));
        assert_eq!(info.sim_mode.as_deref(), Some("detailed"));
        assert_eq!(parse_models(&body, None).model_id.as_deref(), Some("a"));
        assert_eq!(parse_models(&body, None).time_scale, None);
        let top = json!({"data":[{"id":"x"}],"time_scale":2.5});
        assert_eq!(parse_models(&top, None).time_scale, Some(2.5));
    }

    #[test]
    fn error_envelope_message_is_extracted() {
        let m =
            error_envelope_message(br#"{"error":{"message":"overloaded","type":"x","code":503}}"#);
        assert_eq!(m, "overloaded");
        assert_eq!(error_envelope_message(b"plain"), "plain");
    }
}
