//! Streaming answers (SSE).
//!
//! The response head is sent once every choice has committed (its first token arrived), so that a
//! request failing before any token gets a proper error status and the `x-pdserve-*` headers name
//! the instances actually used. Then a task merges the choices' events into chunks:
//!
//! - chat: one role chunk per choice, then content chunks; completions: text chunks;
//! - a choice's end is a chunk with an empty delta and its `finish_reason`;
//! - with `include_usage`, every chunk has `usage: null` and a final chunk with `choices: []`
//!   carries the usage; the stream's last chunk carries the `pdserve` extension;
//! - on success the stream ends with `data: [DONE]`; on a failure it ends right after one
//!   `data: {"error": …}` event (no `[DONE]`).
//!
//! If the client goes away, the task ends, which drops every choice and aborts its legs.

use std::sync::Arc;

use futures::StreamExt;
use futures::future::try_join_all;
use futures::stream::select_all;
use pdserve_protocol::ApiError;
use tokio::sync::mpsc;

use crate::generate::{
    Choice, FinishedChoice, Reply, extension, headers_from, record_tokens, usage,
};
use crate::orchestrate::{GenEvent, Placement};
use crate::respond::{self, ChunkPart, ResponseContext};
use crate::state::{Admission, AppState};

/// The `data:` payload that ends a successful stream.
pub const DONE: &str = "[DONE]";

/// Waits for every choice to commit, then starts the chunk task.
pub(crate) async fn start(
    state: Arc<AppState>,
    ctx: ResponseContext,
    mut choices: Vec<Choice>,
    prompt_lens: Vec<u64>,
    admission: Admission,
) -> Result<Reply, ApiError> {
    let placements: Vec<Placement> = try_join_all(choices.iter_mut().map(|c| async {
        match c.handle.next().await {
            Some(GenEvent::Started(p)) => Ok(p),
            Some(GenEvent::Failed(e)) => Err(e),
            _ => Err(ApiError::internal(
                "generation ended before its first token",
            )),
        }
    }))
    .await?;
    let named: Vec<_> = placements
        .iter()
        .map(|p| {
            (
                p.prefill_instance.as_deref().map(String::from),
                p.decode_instance.to_string(),
            )
        })
        .collect();
    let headers = headers_from(&named, placements.first().map(|p| &p.timings));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _admission = admission;
        if let Err(e) = run(&state, &ctx, choices, &prompt_lens, &tx).await {
            tracing::warn!(status = e.status(), message = %e.message,
                diagnostic = e.diagnostic.as_deref().unwrap_or(""), "stream failed");
            let payload = serde_json::to_string(&e.envelope()).unwrap_or_default();
            let _ = tx.send(payload).await;
        }
    });
    Ok(Reply::Stream {
        headers,
        events: rx,
    })
}

struct Slot {
    index: u32,
    prompt_index: usize,
    max_tokens: u32,
    assembler: crate::assemble::ChoiceAssembler,
    stop: crate::orchestrate::StopSignal,
}

fn encode(r: Result<String, serde_json::Error>) -> Result<String, ApiError> {
    r.map_err(|e| ApiError::internal(format!("serializing a chunk: {e}")))
}

/// Sends a payload; `Ok(false)` when the client is gone.
async fn send(tx: &mpsc::Sender<String>, payload: String) -> bool {
    tx.send(payload).await.is_ok()
}

async fn run(
    state: &AppState,
    ctx: &ResponseContext,
    choices: Vec<Choice>,
    prompt_lens: &[u64],
    tx: &mpsc::Sender<String>,
) -> Result<(), ApiError> {
    let mut slots = Vec::with_capacity(choices.len());
    let mut receivers = Vec::with_capacity(choices.len());
    for (slot, c) in choices.into_iter().enumerate() {
        let (events, stop) = c.handle.into_parts();
        receivers.push(
            futures::stream::unfold(
                events,
                |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
            )
            .map(move |e| (slot, e))
            .boxed(),
        );
        slots.push(Slot {
            index: c.index,
            prompt_index: c.prompt_index,
            max_tokens: c.max_tokens,
            assembler: c.assembler,
            stop,
        });
    }
    if ctx.endpoint == respond::Endpoint::Chat {
        for s in &slots {
            if !send(
                tx,
                encode(respond::chunk(ctx, s.index, ChunkPart::Role, None))?,
            )
            .await
            {
                return Ok(());
            }
        }
    }
    let total = slots.len();
    let mut finished: Vec<FinishedChoice> = Vec::with_capacity(total);
    let mut merged = select_all(receivers);
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return Ok(()),
            next = merged.next() => next,
        };
        let Some((slot_index, event)) = next else {
            break;
        };
        let Some(slot) = slots.get_mut(slot_index) else {
            continue;
        };
        let delta = match event {
            GenEvent::Started(_) => continue,
            GenEvent::Tokens {
                ids,
                logprobs,
                finish_reason,
            } => {
                let d = slot
                    .assembler
                    .push(&*state.text, &ids, logprobs.as_deref(), finish_reason);
                if slot.assembler.finish_reason().is_some() && finish_reason.is_none() {
                    slot.stop.fire();
                }
                d
            }
            GenEvent::Finished(outcome) => {
                let d = slot.assembler.finish(&*state.text, slot.max_tokens);
                if !d.text.is_empty() || !d.logprobs.is_empty() {
                    let part = ChunkPart::Text(&d.text, &d.logprobs);
                    if !send(tx, encode(respond::chunk(ctx, slot.index, part, None))?).await {
                        return Ok(());
                    }
                }
                let reason = slot
                    .assembler
                    .finish_reason()
                    .ok_or_else(|| ApiError::internal("choice finished without a reason"))?;
                state
                    .metrics
                    .generation_finished(crate::metrics::finish_label(reason));
                finished.push(FinishedChoice {
                    prompt_index: slot.prompt_index,
                    completion_tokens: slot.assembler.completion_tokens(),
                    outcome,
                });
                let last = finished.len() == total && !ctx.include_usage;
                let ext = last.then(|| extension(&finished));
                let payload = encode(respond::chunk(
                    ctx,
                    slot.index,
                    ChunkPart::Finish(reason),
                    ext,
                ))?;
                if !send(tx, payload).await {
                    return Ok(());
                }
                continue;
            }
            GenEvent::Failed(error) => return Err(error),
        };
        if !delta.text.is_empty() || !delta.logprobs.is_empty() {
            let part = ChunkPart::Text(&delta.text, &delta.logprobs);
            if !send(tx, encode(respond::chunk(ctx, slot.index, part, None))?).await {
                return Ok(());
            }
        }
    }
    if finished.len() != total {
        return Err(ApiError::internal("a generation ended without an outcome"));
    }
    let usage = usage(prompt_lens, &finished);
    record_tokens(state, &usage);
    if ctx.include_usage {
        let payload = encode(respond::usage_chunk(ctx, usage, extension(&finished)))?;
        if !send(tx, payload).await {
            return Ok(());
        }
    }
    send(tx, DONE.to_string()).await;
    Ok(())
}
