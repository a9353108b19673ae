//! What one step runs: the [`StepPlan`] that [`Scheduler::step`](crate::Scheduler::step) returns.
//!
//! A plan is self-contained (token ids, positions, block tables, sampling parameters are copied in) so
//! an executor can run it on another thread while the state keeps accepting requests and
//! cancellations. Invariants of a plan:
//! - `num_batched_tokens <= max_batched_tokens`, counting each prefill chunk's tokens and
//!   `1 + spec_tokens` per decode (the draft slot is reserved whether or not a draft is pending);
//! - every listed sequence's block table covers the positions the step writes (a decode: its input and
//!   draft positions; a prefill chunk: up to its end);
//! - a sequence appears at most once, and never both in `preempted` and in the batch;
//! - `kv_loads` must be written into the latent store before the batch runs.

use crate::block_pool::BlockId;
use crate::sequence::{RequestId, TokenId};
use crate::stop::FinishReason;

/// One prefill chunk: compute the KV of positions `start_pos..start_pos + tokens.len()`.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillChunk<P> {
    /// The sequence.
    pub id: RequestId,
    /// Token ids at the chunk's positions (prompt, or prompt plus earlier output when recomputing).
    pub tokens: Vec<TokenId>,
    /// Position of `tokens[0]`; positions before it are already in the cache.
    pub start_pos: usize,
    /// Last chunk: sample the token after it (index `num_output_tokens` of the output), and with
    /// speculative decoding also propose a draft for the one after.
    pub samples: bool,
    /// Output tokens so far (the sampled token's index in the output, for seeded sampling).
    pub num_output_tokens: usize,
    /// The sequence's block table.
    pub block_table: Vec<BlockId>,
    /// Sampling parameters.
    pub params: P,
    /// Micro-batch (0 or 1) under two-batch overlap; 0 when it is off.
    pub micro_batch: u8,
}

/// One decode: compute `input_token` at `position` (and verify `draft_token` at `position + 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeItem<P> {
    /// The sequence.
    pub id: RequestId,
    /// The last token, whose KV is not yet cached.
    pub input_token: TokenId,
    /// Draft proposed last step for the next token; verify it (accept iff the model's token at
    /// `position` equals it, then also emit the token after it).
    pub draft_token: Option<TokenId>,
    /// Position of `input_token` (= cached tokens).
    pub position: usize,
    /// Output tokens so far (index of the token this step samples first).
    pub num_output_tokens: usize,
    /// The sequence's block table.
    pub block_table: Vec<BlockId>,
    /// Sampling parameters.
    pub params: P,
    /// Micro-batch (0 or 1) under two-batch overlap; 0 when it is off.
    pub micro_batch: u8,
}

impl<P> DecodeItem<P> {
    /// Tokens computed (1, or 2 with a draft).
    pub fn num_query_tokens(&self) -> usize {
        1 + usize::from(self.draft_token.is_some())
    }
}

/// KV computed elsewhere that must be written into these blocks before the step runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLoad {
    /// The sequence (its arrived prompt KV).
    pub id: RequestId,
    /// Positions `0..num_tokens` to write.
    pub num_tokens: usize,
    /// Where they go.
    pub block_table: Vec<BlockId>,
}

/// The work of one step and the state changes the executor should know about.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan<P> {
    /// Increasing step number.
    pub step_id: u64,
    /// The `now_ns` the step was planned at.
    pub now_ns: u64,
    /// Draft tokens per decode (0 or 1): whether samplers should also propose drafts.
    pub spec_tokens: usize,
    /// Arrived KV to write before running.
    pub kv_loads: Vec<KvLoad>,
    /// Prefill chunks, in FCFS order.
    pub prefills: Vec<PrefillChunk<P>>,
    /// Decodes, in FCFS order.
    pub decodes: Vec<DecodeItem<P>>,
    /// Sequences preempted by this step (blocks freed; they will be recomputed).
    pub preempted: Vec<RequestId>,
    /// Sequences that finished or were cancelled since the previous plan (drop their state).
    pub finished: Vec<(RequestId, FinishReason)>,
    /// Tokens planned (see the module docs).
    pub num_batched_tokens: usize,
    /// Work of each micro-batch when two-batch overlap is on.
    pub micro_batch_work: Option<[u64; 2]>,
}

impl<P> StepPlan<P> {
    /// Whether there is nothing to compute.
    pub fn is_idle(&self) -> bool {
        self.prefills.is_empty() && self.decodes.is_empty()
    }

    /// Sequences in the batch.
    pub fn num_sequences(&self) -> usize {
        self.prefills.len() + self.decodes.len()
    }
}
