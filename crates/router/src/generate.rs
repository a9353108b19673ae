//! The domain call behind both completion endpoints: validate, tokenize, fan out `n` generations
//! per prompt, and answer with one JSON body or an SSE stream ([`Reply`]).
//!
//! Choice `i` of prompt `p` has index `p × n + i`, sampling seed `seed + i`, and its own decode and
//! prefill instances. Usage counts each prompt once and every choice's tokens. A failure of any
//! choice fails the request (before streaming: an error status; while streaming: an error event),
//! and dropping the other choices aborts them.

use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;
use pdserve_protocol::ApiError;
use pdserve_protocol::openai::chat::ChatCompletionRequest;
use pdserve_protocol::openai::completions::CompletionRequest;
use pdserve_protocol::openai::{GenerationReport, ResponseExtension, StageTimings, Usage};
use pdserve_protocol::params::{
    GenerationParams, Prompt, StopParams, validate_chat, validate_completion,
};
use rand::Rng;

use crate::assemble::{ChoiceAssembler, TokenLogprobText};
use crate::metrics::catalog;
use crate::orchestrate::{GenEvent, GenerationHandle, GenerationOutcome, GenerationSpec};
use crate::respond::{
    self, ChoiceResult, Endpoint, HEADER_DECODE_INSTANCE, HEADER_PREFILL_INSTANCE, HEADER_TIMINGS,
    ResponseContext,
};
use crate::state::{Admission, AppState, unix_now_s};
use crate::stream;

/// What a completion endpoint answers.
#[derive(Debug)]
pub enum Reply {
    /// A JSON body.
    Full {
        /// `x-pdserve-*` headers.
        headers: Vec<(&'static str, String)>,
        /// The body.
        body: serde_json::Value,
    },
    /// An SSE stream (the receiver yields the `data:` payloads, `[DONE]` last on success).
    Stream {
        /// `x-pdserve-*` headers (timings known at the first token).
        headers: Vec<(&'static str, String)>,
        /// The payloads.
        events: tokio::sync::mpsc::Receiver<String>,
    },
}

/// One prompt ready for generation.
struct PromptJob {
    ids: Arc<Vec<u32>>,
    stop: StopParams,
}

/// One choice in flight: its generation and the text assembly of its tokens.
#[derive(Debug)]
pub(crate) struct Choice {
    pub(crate) index: u32,
    pub(crate) prompt_index: usize,
    pub(crate) max_tokens: u32,
    pub(crate) handle: GenerationHandle,
    pub(crate) assembler: ChoiceAssembler,
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    state: &Arc<AppState>,
    request: ChatCompletionRequest,
    arrival: Instant,
) -> Result<Reply, ApiError> {
    let admission = state.admit()?;
    let chat = validate_chat(&request, &state.limits)?;
    state.check_model(chat.model.as_deref())?;
    let ids = state.text.encode_chat(&chat.messages)?;
    let stop = chat
        .params
        .stop_params(ids.len(), &state.limits, "messages")?;
    let jobs = vec![PromptJob {
        ids: Arc::new(ids),
        stop,
    }];
    start(
        state,
        Endpoint::Chat,
        jobs,
        &chat.params,
        arrival,
        admission,
    )
    .await
}

/// `POST /v1/completions`.
pub async fn completion(
    state: &Arc<AppState>,
    request: CompletionRequest,
    arrival: Instant,
) -> Result<Reply, ApiError> {
    let admission = state.admit()?;
    let completion = validate_completion(&request, &state.limits)?;
    state.check_model(completion.model.as_deref())?;
    let mut jobs = Vec::with_capacity(completion.prompts.len());
    for prompt in &completion.prompts {
        let ids = match prompt {
            Prompt::Text(text) => state.text.encode(text, true)?,
            Prompt::Tokens(ids) => {
                state.text.check_ids(ids, "prompt")?;
                ids.clone()
            }
        };
        let stop = completion
            .params
            .stop_params(ids.len(), &state.limits, "prompt")?;
        jobs.push(PromptJob {
            ids: Arc::new(ids),
            stop,
        });
    }
    start(
        state,
        Endpoint::Completions,
        jobs,
        &completion.params,
        arrival,
        admission,
    )
    .await
}

fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{:032x}", rand::rng().random::<u128>())
}

async fn start(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    jobs: Vec<PromptJob>,
    params: &GenerationParams,
    arrival: Instant,
    admission: Admission,
) -> Result<Reply, ApiError> {
    let ctx = ResponseContext {
        endpoint,
        id: response_id(endpoint),
        created: unix_now_s(),
        model: state.config.model.clone(),
        want_logprobs: params.sampling.logprobs.is_some(),
        include_usage: params.include_usage,
    };
    let mut choices = Vec::with_capacity(jobs.len() * params.n as usize);
    for (p, job) in jobs.iter().enumerate() {
        for i in 0..params.n {
            let index = p as u32 * params.n + i;
            let spec = GenerationSpec {
                request_id: format!("{}-{index}", ctx.id),
                index,
                seq: state.next_seq(),
                prompt: job.ids.clone(),
                sampling: params.sampling.for_choice(i),
                stop: job.stop.clone(),
                arrival,
            };
            choices.push(Choice {
                index,
                prompt_index: p,
                max_tokens: job.stop.max_tokens,
                handle: state.orchestrator.spawn(spec),
                assembler: ChoiceAssembler::new(
                    &job.ids,
                    params.stop_strings.clone(),
                    params.min_tokens,
                    ctx.want_logprobs,
                ),
            });
        }
    }
    let prompt_lens: Vec<u64> = jobs.iter().map(|j| j.ids.len() as u64).collect();
    if params.stream {
        stream::start(state.clone(), ctx, choices, prompt_lens, admission).await
    } else {
        let finished = try_join_all(choices.into_iter().map(|c| collect(state, c))).await?;
        let (results, outcomes): (Vec<_>, Vec<_>) = finished.into_iter().unzip();
        let usage = usage(&prompt_lens, &outcomes);
        record_tokens(state, &usage);
        let extension = extension(&outcomes);
        let headers = headers(&extension.generations);
        let body = respond::full_body(&ctx, results, usage, extension)
            .map_err(|e| ApiError::internal(format!("serializing the response: {e}")))?;
        drop(admission);
        Ok(Reply::Full { headers, body })
    }
}

/// A finished choice with its outcome and its prompt's index.
pub(crate) struct FinishedChoice {
    pub(crate) prompt_index: usize,
    pub(crate) completion_tokens: u32,
    pub(crate) outcome: GenerationOutcome,
}

/// Runs one choice to its end for a non-streaming answer.
async fn collect(
    state: &AppState,
    mut choice: Choice,
) -> Result<(ChoiceResult, FinishedChoice), ApiError> {
    let mut text = String::new();
    let mut logprobs: Vec<TokenLogprobText> = Vec::new();
    loop {
        match choice.handle.next().await {
            Some(GenEvent::Started(_)) => {}
            Some(GenEvent::Tokens {
                ids,
                logprobs: lps,
                finish_reason,
            }) => {
                let delta =
                    choice
                        .assembler
                        .push(&*state.text, &ids, lps.as_deref(), finish_reason);
                text.push_str(&delta.text);
                logprobs.extend(delta.logprobs);
                if choice.assembler.finish_reason().is_some() && finish_reason.is_none() {
                    choice.handle.stop_early();
                }
            }
            Some(GenEvent::Finished(outcome)) => {
                let delta = choice.assembler.finish(&*state.text, choice.max_tokens);
                text.push_str(&delta.text);
                logprobs.extend(delta.logprobs);
                let finish_reason = choice
                    .assembler
                    .finish_reason()
                    .ok_or_else(|| ApiError::internal("choice finished without a reason"))?;
                state
                    .metrics
                    .generation_finished(crate::metrics::finish_label(finish_reason));
                return Ok((
                    ChoiceResult {
                        index: choice.index,
                        text,
                        logprobs,
                        finish_reason,
                    },
                    FinishedChoice {
                        prompt_index: choice.prompt_index,
                        completion_tokens: choice.assembler.completion_tokens(),
                        outcome,
                    },
                ));
            }
            Some(GenEvent::Failed(error)) => return Err(error),
            None => return Err(ApiError::internal("generation ended without an outcome")),
        }
    }
}

/// Usage over all choices: each prompt once, every choice's tokens; cached tokens per prompt are
/// the smallest any of its choices saw.
pub(crate) fn usage(prompt_lens: &[u64], finished: &[FinishedChoice]) -> Usage {
    let completion: u64 = finished
        .iter()
        .map(|f| u64::from(f.completion_tokens))
        .sum();
    let cached: u64 = (0..prompt_lens.len())
        .map(|p| {
            finished
                .iter()
                .filter(|f| f.prompt_index == p)
                .map(|f| u64::from(f.outcome.cached_tokens))
                .min()
                .unwrap_or(0)
        })
        .sum();
    Usage::new(prompt_lens.iter().sum(), completion, cached)
}

pub(crate) fn record_tokens(state: &AppState, usage: &Usage) {
    state
        .metrics
        .add(&catalog::ROUTER_PROMPT_TOKENS_TOTAL, usage.prompt_tokens);
    state.metrics.add(
        &catalog::ROUTER_GENERATION_TOKENS_TOTAL,
        usage.completion_tokens,
    );
    let cached = usage
        .prompt_tokens_details
        .as_ref()
        .map_or(0, |d| d.cached_tokens);
    state
        .metrics
        .add(&catalog::ROUTER_CACHED_TOKENS_TOTAL, cached);
}

pub(crate) fn extension(finished: &[FinishedChoice]) -> ResponseExtension {
    let mut generations: Vec<GenerationReport> =
        finished.iter().map(|f| f.outcome.report.clone()).collect();
    generations.sort_by_key(|g| g.index);
    ResponseExtension { generations }
}

/// `x-pdserve-*` headers from per-choice placements, ordered by choice index.
pub(crate) fn headers_from(
    placements: &[(Option<String>, String)],
    timings: Option<&StageTimings>,
) -> Vec<(&'static str, String)> {
    let prefill: Vec<&str> = placements
        .iter()
        .map(|(p, _)| p.as_deref().unwrap_or("-"))
        .collect();
    let decode: Vec<&str> = placements.iter().map(|(_, d)| d.as_str()).collect();
    let mut headers = vec![
        (HEADER_PREFILL_INSTANCE, prefill.join(",")),
        (HEADER_DECODE_INSTANCE, decode.join(",")),
    ];
    if let Some(t) = timings {
        headers.push((HEADER_TIMINGS, respond::timings_header(t)));
    }
    headers
}

fn headers(reports: &[GenerationReport]) -> Vec<(&'static str, String)> {
    let placements: Vec<_> = reports
        .iter()
        .map(|r| (r.prefill_instance.clone(), r.decode_instance.clone()))
        .collect();
    headers_from(&placements, reports.first().map(|r| &r.timings))
}
