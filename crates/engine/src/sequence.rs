//! Requests as submitted, and sequences as the engine tracks them.
//!
//! A [`Request`] is what a service submits: prompt token ids, typed sampling parameters `P` (opaque to
//! the scheduler, handed to the executor), [`StopConditions`], and where its KV comes from
//! ([`KvSource`]): computed here (prefill, chunked) or already computed by a prefill instance and
//! arriving with the first sampled token (straight to decode).
//!
//! A [`Sequence`] is the engine's state for one request. Its tokens are `prompt ++ output`;
//! `num_computed_tokens` of them have their latent KV in the cache (the next position to compute).
//! Invariants:
//! - `num_computed_tokens <= num_tokens()`; a decoding sequence has exactly its last token uncomputed
//!   (`num_computed_tokens + 1 == num_tokens()`);
//! - a `Waiting`/`Preempted` sequence holds no KV blocks and has `num_computed_tokens == 0`, except a
//!   waiting request whose KV arrived (its KV is written into blocks when it is admitted);
//! - preemption keeps the output (already streamed) and recomputes the KV of `prompt ++ output`, which is
//!   recompute-by-prompt-extension without moving tokens between the two lists.

use std::fmt;

use crate::stop::{FinishReason, IncrementalDetokenizer, StopChecker, StopConditions};

/// A token id of the model's vocabulary.
pub type TokenId = u32;

/// Identifies a request across services; chosen by the caller, unique within one engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a request's prompt KV comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvSource {
    /// Compute the prompt here (chunked prefill); the last chunk samples the first token.
    Compute,
    /// A prefill instance computed the prompt's KV and sampled `first_token`; the KV is written into
    /// this engine's blocks on admission (see [`StepPlan::kv_loads`](crate::StepPlan::kv_loads)) and
    /// the request goes straight to decode.
    Arrived {
        /// The token the prefill instance sampled after the prompt.
        first_token: TokenId,
        /// The prefill instance's MTP draft for the token after `first_token`: the first decode
        /// step verifies it when speculative decoding is on (ignored otherwise).
        draft: Option<TokenId>,
    },
}

/// A request as submitted to the engine. `P` is the executor's sampling parameters.
pub struct Request<P> {
    /// Caller-chosen id.
    pub id: RequestId,
    /// Prompt token ids (non-empty).
    pub prompt: Vec<TokenId>,
    /// Sampling parameters, passed to the executor untouched.
    pub params: P,
    /// When to stop.
    pub stop: StopConditions,
    /// Where the prompt's KV comes from.
    pub kv: KvSource,
    /// Produces text for stop strings and streaming; required when `stop.stop_strings` is non-empty.
    pub detokenizer: Option<Box<dyn IncrementalDetokenizer>>,
    /// Keep the KV blocks after finishing until [`EngineState::release_kv`](crate::EngineState::release_kv)
    /// (a prefill instance keeps them until the KV has been sent to decode).
    pub retain_kv_on_finish: bool,
    /// Arrival time on the caller's clock (for queue time).
    pub arrival_ns: u64,
}

impl<P> Request<P> {
    /// A request computing its prompt here, no stop conditions, arriving at time 0.
    pub fn new(id: RequestId, prompt: Vec<TokenId>, params: P) -> Self {
        Self {
            id,
            prompt,
            params,
            stop: StopConditions::default(),
            kv: KvSource::Compute,
            detokenizer: None,
            retain_kv_on_finish: false,
            arrival_ns: 0,
        }
    }

    /// Sets the stop conditions.
    pub fn with_stop(mut self, stop: StopConditions) -> Self {
        self.stop = stop;
        self
    }

    /// Marks the prompt's KV as computed elsewhere, with the first sampled token.
    pub fn with_kv_arrived(mut self, first_token: TokenId) -> Self {
        self.kv = KvSource::Arrived {
            first_token,
            draft: None,
        };
        self
    }

    /// Sets the draft that came with arrived KV (no effect on a prompt computed here).
    pub fn with_kv_draft(mut self, draft_token: Option<TokenId>) -> Self {
        if let KvSource::Arrived { draft, .. } = &mut self.kv {
            *draft = draft_token;
        }
        self
    }

    /// Sets the detokenizer.
    pub fn with_detokenizer(mut self, detokenizer: Box<dyn IncrementalDetokenizer>) -> Self {
        self.detokenizer = Some(detokenizer);
        self
    }

    /// Keeps the KV blocks after finishing, until released.
    pub fn with_retained_kv(mut self) -> Self {
        self.retain_kv_on_finish = true;
        self
    }

    /// Sets the arrival time.
    pub fn arrived_at(mut self, arrival_ns: u64) -> Self {
        self.arrival_ns = arrival_ns;
        self
    }
}

impl<P: fmt::Debug> fmt::Debug for Request<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("prompt_len", &self.prompt.len())
            .field("params", &self.params)
            .field("stop", &self.stop)
            .field("kv", &self.kv)
            .field("has_detokenizer", &self.detokenizer.is_some())
            .field("retain_kv_on_finish", &self.retain_kv_on_finish)
            .field("arrival_ns", &self.arrival_ns)
            .finish()
    }
}

/// Lifecycle of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceState {
    /// Queued, never admitted.
    Waiting,
    /// Admitted: holds KV blocks and is scheduled in steps.
    Running,
    /// Evicted to free blocks; queued at the front for recompute.
    Preempted,
    /// Done; only visible while its KV is retained.
    Finished(FinishReason),
}

/// Which kind of work a running sequence needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Computing the KV of `prompt ++ output` in chunks; the last chunk samples a token.
    Prefill,
    /// One token (plus a draft with speculative decoding) per step.
    Decode,
}

/// The engine's state for one request.
#[derive(Debug)]
pub struct Sequence<P> {
    pub(crate) id: RequestId,
    pub(crate) prompt: Vec<TokenId>,
    pub(crate) output: Vec<TokenId>,
    pub(crate) num_computed_tokens: usize,
    pub(crate) state: SequenceState,
    pub(crate) phase: Phase,
    pub(crate) params: P,
    pub(crate) stop: StopChecker,
    pub(crate) arrival_ns: u64,
    /// Position in FCFS order (assigned when added; lower is older).
    pub(crate) arrival_order: u64,
    pub(crate) first_scheduled_ns: Option<u64>,
    pub(crate) queue_time_reported: bool,
    /// Draft token proposed by MTP for the position after the last token.
    pub(crate) draft: Option<TokenId>,
    pub(crate) retain_kv: bool,
    /// Arrived KV not yet written into blocks.
    pub(crate) kv_pending: bool,
    pub(crate) num_preemptions: u32,
}

impl<P> Sequence<P> {
    /// The request id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Prompt token ids.
    pub fn prompt(&self) -> &[TokenId] {
        &self.prompt
    }

    /// Generated token ids so far.
    pub fn output(&self) -> &[TokenId] {
        &self.output
    }

    /// Prompt plus output tokens.
    pub fn num_tokens(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    /// Tokens whose KV is in the cache: the next position to compute.
    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    /// Lifecycle state.
    pub fn state(&self) -> SequenceState {
        self.state
    }

    /// Prefill or decode.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Sampling parameters.
    pub fn params(&self) -> &P {
        &self.params
    }

    /// Pending draft token (speculative decoding).
    pub fn draft(&self) -> Option<TokenId> {
        self.draft
    }

    /// Times this sequence was preempted.
    pub fn num_preemptions(&self) -> u32 {
        self.num_preemptions
    }

    /// Arrival time on the caller's clock.
    pub fn arrival_ns(&self) -> u64 {
        self.arrival_ns
    }

    /// The `now_ns` of the first step that scheduled it.
    pub fn first_scheduled_ns(&self) -> Option<u64> {
        self.first_scheduled_ns
    }

    /// Token at position `pos` of `prompt ++ output`.
    pub fn token(&self, pos: usize) -> Option<TokenId> {
        match pos.checked_sub(self.prompt.len()) {
            None => self.prompt.get(pos).copied(),
            Some(i) => self.output.get(i).copied(),
        }
    }

    /// Tokens at positions `start..end` of `prompt ++ output` (clamped to what exists).
    pub fn tokens(&self, start: usize, end: usize) -> Vec<TokenId> {
        let split = self.prompt.len();
        let end = end.min(self.num_tokens());
        let start = start.min(end);
        let mut out = Vec::with_capacity(end - start);
        if start < split {
            out.extend_from_slice(&self.prompt[start..end.min(split)]);
        }
        if end > split {
            out.extend_from_slice(&self.output[start.max(split) - split..end - split]);
        }
        out
    }

    /// The last token (the decode step's input).
    pub fn last_token(&self) -> Option<TokenId> {
        self.output.last().or(self.prompt.last()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(prompt: Vec<TokenId>, output: Vec<TokenId>) -> Sequence<()> {
        Sequence {
            id: RequestId(1),
            prompt,
            output,
            num_computed_tokens: 0,
            state: SequenceState::Waiting,
            phase: Phase::Prefill,
            params: (),
            stop: StopChecker::new(StopConditions::default(), None).unwrap(),
            arrival_ns: 0,
            arrival_order: 0,
            first_scheduled_ns: None,
            queue_time_reported: false,
            draft: None,
            retain_kv: false,
            kv_pending: false,
            num_preemptions: 0,
        }
    }

    #[test]
    fn tokens_span_prompt_and_output() {
        let s = seq(vec![1, 2, 3], vec![4, 5]);
        assert_eq!(s.tokens(0, 5), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.tokens(2, 4), vec![3, 4]);
        assert_eq!(s.tokens(3, 9), vec![4, 5]);
        assert_eq!(s.tokens(4, 2), Vec::<TokenId>::new());
        assert_eq!(
            (s.token(2), s.token(3), s.token(5)),
            (Some(3), Some(4), None)
        );
        assert_eq!(s.last_token(), Some(5));
        assert_eq!(seq(vec![7], vec![]).last_token(), Some(7));
    }
}
