//! The types a generation's consumer sees: what to run ([`GenerationSpec`]), the events
//! ([`GenEvent`]) on its [`GenerationHandle`], and where it ran ([`Placement`],
//! [`GenerationOutcome`]). [`crate::orchestrate`] produces them and re-exports them.
//!
//! Invariant: a handle yields `Started` before the first `Tokens` and exactly one final event
//! (`Finished` or `Failed`), or nothing more once the generation's consumer went away.

use std::sync::Arc;
use std::time::Instant;

use pdserve_protocol::ApiError;
use pdserve_protocol::internal::TokenLogprob;
use pdserve_protocol::openai::{FinishReason, GenerationReport, StageTimings};
use pdserve_protocol::params::{SamplingParams, StopParams};
use tokio::sync::{mpsc, oneshot};

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerationSpec {
    /// Unique id (names the KV frame and both legs; a retried pair's legs add `.<n>`).
    pub request_id: String,
    /// Choice index in the response.
    pub index: u32,
    /// Router sequence number (policies' round-robin position and RNG stream).
    pub seq: u64,
    /// Prompt token ids.
    pub prompt: Arc<Vec<u32>>,
    /// Sampling of this choice.
    pub sampling: SamplingParams,
    /// Token-level stops.
    pub stop: StopParams,
    /// When the HTTP request arrived.
    pub arrival: Instant,
}

/// Where a generation runs, known once decode committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Prefill instance of the attempt in flight or done at commit time.
    pub prefill_instance: Option<Arc<str>>,
    /// Decode instance.
    pub decode_instance: Arc<str>,
    /// Prefill attempts so far.
    pub prefill_attempts: u32,
    /// Timings known at commit (router, first token, and prefill's if it answered already).
    pub timings: StageTimings,
}

/// How a generation ended, for usage and the `pdserve` extension.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutcome {
    /// Placement and timings.
    pub report: GenerationReport,
    /// Prompt tokens served from the prefill prefix cache.
    pub cached_tokens: u32,
}

/// What the consumer receives.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Decode committed; sent once, before the first tokens.
    Started(Placement),
    /// New tokens from decode.
    Tokens {
        /// Ids.
        ids: Vec<u32>,
        /// Parallel logprobs when requested.
        logprobs: Option<Vec<TokenLogprob>>,
        /// Set on the last tokens of the generation.
        finish_reason: Option<FinishReason>,
    },
    /// The generation ended (normally or by early stop).
    Finished(GenerationOutcome),
    /// The generation failed.
    Failed(ApiError),
}

/// The consumer's end of a generation.
#[derive(Debug)]
pub struct GenerationHandle {
    /// Choice index.
    pub index: u32,
    pub(crate) events: mpsc::Receiver<GenEvent>,
    pub(crate) stop: StopSignal,
}

impl GenerationHandle {
    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.events.recv().await
    }

    /// Ends the generation early (a stop string matched): both legs are aborted, and a `Finished`
    /// still follows. Tokens already in the channel may precede it.
    pub fn stop_early(&mut self) {
        self.stop.fire();
    }

    /// Splits into the event receiver and the early-stop signal (to merge several streams).
    pub fn into_parts(self) -> (mpsc::Receiver<GenEvent>, StopSignal) {
        (self.events, self.stop)
    }
}

/// Fires a generation's early stop (once; later calls do nothing).
#[derive(Debug)]
pub struct StopSignal(pub(crate) Option<oneshot::Sender<()>>);

impl StopSignal {
    /// Requests the early stop.
    pub fn fire(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}
