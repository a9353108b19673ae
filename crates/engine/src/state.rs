//! The engine's mutable state: sequences, queues, the block pool and statistics.
//!
//! [`EngineState`] is owned by one task (the engine actor) and changed only through its methods and
//! [`Scheduler::step`](crate::Scheduler::step); nothing here is async, reads a clock or blocks.
//!
//! Invariants (checked by [`EngineState::check_invariants`] and property tests):
//! - `waiting` and `running` are disjoint and each sorted by arrival order (FCFS); every sequence is in
//!   exactly one of them, or finished with its KV retained;
//! - only running and retained sequences hold blocks, and the pool's own invariants hold;
//! - between `step` and `apply` exactly one plan is in flight; `step` refuses to plan another.
//!   Cancelling during that window is safe: blocks are freed at once, and since no new plan (hence no
//!   new allocation) happens before `apply`, an executor still writing into them harms nobody; the
//!   cancelled sequence's outputs are ignored.

use std::collections::{HashMap, VecDeque};

use crate::block_pool::{BlockId, BlockPool, PoolError};
use crate::config::SchedulerConfig;
use crate::executor::SeqOutput;
use crate::sequence::{KvSource, Phase, Request, RequestId, Sequence, SequenceState, TokenId};
use crate::stats::EngineStats;
use crate::stop::{Finish, FinishReason, StopChecker, StopConfigError};

/// A request refused by [`EngineState::add_request`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The id is already in use in this engine.
    #[error("request {0}: id already in use")]
    DuplicateId(RequestId),
    /// The prompt has no tokens.
    #[error("request {0}: `prompt` is empty")]
    EmptyPrompt(RequestId),
    /// The prompt leaves no room for an output token within the context (the pool always holds one
    /// full context, see [`SchedulerConfig::validate`]).
    #[error(
        "request {id}: `prompt` has {prompt_tokens} tokens; the model's context of \
         {max_context_tokens} tokens allows at most {} prompt tokens",
        max_context_tokens - 1
    )]
    PromptTooLong {
        /// The request.
        id: RequestId,
        /// Its prompt length.
        prompt_tokens: usize,
        /// The context limit.
        max_context_tokens: usize,
    },
    /// Invalid stop conditions.
    #[error("request {id}: {source}")]
    Stop {
        /// The request.
        id: RequestId,
        /// What is wrong.
        source: StopConfigError,
    },
}

/// Misuse of the step protocol (a driver bug, reported instead of panicking).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// `step` was called while the previous plan awaits `apply`/`fail_step`.
    #[error("step {step_id} is still in flight: apply its outputs before planning another")]
    StepInFlight {
        /// The step in flight.
        step_id: u64,
    },
    /// `apply`/`fail_step` was called with no plan in flight.
    #[error("no step in flight to apply outputs to")]
    NoStepInFlight,
    /// The state was built for a different configuration than the scheduler's.
    #[error("the engine state was built from a different scheduler config")]
    ConfigMismatch,
    /// The block pool failed an operation the scheduler had checked.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// An id that [`EngineState::cancel`] or [`EngineState::release_kv`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No such request (never added, or already finished and released).
    #[error("request {0}: unknown or already finished")]
    Unknown(RequestId),
    /// `release_kv` on a request that has not finished.
    #[error("request {0}: still in progress, its KV cannot be released")]
    NotFinished(RequestId),
}

/// What happened to one request: new tokens and/or its finish. Stream these to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqUpdate {
    /// The request.
    pub id: RequestId,
    /// New output tokens.
    pub tokens: Vec<TokenId>,
    /// Their log-probabilities (empty if the executor gave none).
    pub logprobs: Vec<f32>,
    /// The most likely alternatives of each token (id, logprob; best first): empty, or one entry
    /// per token.
    pub top_logprobs: Vec<Vec<(TokenId, f32)>>,
    /// New text (with a detokenizer; stop strings excluded, possible stop-string prefixes held back).
    pub text: Option<String>,
    /// Set on the last update of the request.
    pub finish: Option<Finish>,
    /// Prompt length (usage).
    pub num_prompt_tokens: usize,
    /// Output tokens so far (usage).
    pub num_output_tokens: usize,
    /// Time from arrival to first scheduling, on the first update after it was first scheduled.
    pub queue_time_ns: Option<u64>,
}

/// How a sequence was scheduled in the plan in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheduled {
    Prefill { end: usize, samples: bool },
    Decode { had_draft: bool },
}

#[derive(Clone, Debug)]
pub(crate) struct InFlight {
    pub(crate) step_id: u64,
    pub(crate) entries: Vec<(RequestId, Scheduled)>,
}

/// All mutable engine state. Create it with [`Scheduler::new_state`](crate::Scheduler::new_state).
#[derive(Debug)]
pub struct EngineState<P> {
    pub(crate) config: SchedulerConfig,
    pub(crate) pool: BlockPool,
    pub(crate) seqs: HashMap<RequestId, Sequence<P>>,
    /// Sorted by arrival order.
    pub(crate) waiting: VecDeque<RequestId>,
    /// Sorted by arrival order.
    pub(crate) running: Vec<RequestId>,
    pub(crate) next_arrival_order: u64,
    pub(crate) next_step_id: u64,
    pub(crate) in_flight: Option<InFlight>,
    pub(crate) finished_since_plan: Vec<(RequestId, FinishReason)>,
    pub(crate) stats: EngineStats,
}

impl<P> EngineState<P> {
    /// `config` must be validated (its block count then fits in `u32`).
    pub(crate) fn new(config: SchedulerConfig) -> Self {
        let pool = BlockPool::new(u32::try_from(config.num_kv_blocks).unwrap_or(u32::MAX));
        let stats = EngineStats {
            kv_blocks_total: pool.capacity_blocks(),
            spec_accepted_per_pos: vec![0; config.spec_tokens],
            ..EngineStats::default()
        };
        Self {
            config,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival_order: 0,
            next_step_id: 0,
            in_flight: None,
            finished_since_plan: Vec::new(),
            stats,
        }
    }

    /// Queues a request (FCFS). A request whose KV arrived starts with its first token, which is
    /// checked against the stop conditions at once and returned as an update (with a finish if it
    /// already ends the request, in which case nothing is queued). Returns `None` for a request that
    /// computes its prompt here.
    pub fn add_request(&mut self, request: Request<P>) -> Result<Option<SeqUpdate>, AdmitError> {
        let result = self.try_add(request);
        match &result {
            Ok(_) => self.stats.requests_added_total += 1,
            Err(_) => self.stats.requests_rejected_total += 1,
        }
        self.refresh_gauges();
        result
    }

    fn try_add(&mut self, request: Request<P>) -> Result<Option<SeqUpdate>, AdmitError> {
        let id = request.id;
        if self.seqs.contains_key(&id) {
            return Err(AdmitError::DuplicateId(id));
        }
        if request.prompt.is_empty() {
            return Err(AdmitError::EmptyPrompt(id));
        }
        let max_context_tokens = self.config.max_context_tokens;
        if request.prompt.len() >= max_context_tokens {
            return Err(AdmitError::PromptTooLong {
                id,
                prompt_tokens: request.prompt.len(),
                max_context_tokens,
            });
        }
        let stop = StopChecker::new(request.stop, request.detokenizer)
            .map_err(|source| AdmitError::Stop { id, source })?;
        let arrival_order = self.next_arrival_order;
        self.next_arrival_order += 1;
        let mut seq = Sequence {
            id,
            prompt: request.prompt,
            output: Vec::new(),
            num_computed_tokens: 0,
            state: SequenceState::Waiting,
            phase: Phase::Prefill,
            params: request.params,
            stop,
            arrival_ns: request.arrival_ns,
            arrival_order,
            first_scheduled_ns: None,
            queue_time_reported: false,
            draft: None,
            retain_kv: request.retain_kv_on_finish,
            kv_pending: false,
            num_preemptions: 0,
        };
        let mut update = None;
        if let KvSource::Arrived { first_token, draft } = request.kv {
            seq.num_computed_tokens = seq.prompt.len();
            seq.phase = Phase::Decode;
            seq.kv_pending = true;
            seq.output.push(first_token);
            // Prefill's MTP draft: verified in the first decode step like any pending draft.
            seq.draft = draft.filter(|_| self.config.spec_tokens > 0);
            let finish = seq
                .stop
                .check(first_token, 1, seq.num_tokens(), max_context_tokens);
            let done = finish.is_some();
            update = Some(make_update(&mut seq, vec![first_token], Vec::new(), finish));
            if done {
                // Finished before taking any block; nothing to retain.
                if let Some(reason) = update.as_ref().and_then(|u| u.finish.as_ref()) {
                    self.stats.requests_finished_total.add(reason.reason);
                }
                return Ok(update);
            }
        }
        self.waiting.push_back(id);
        self.seqs.insert(id, seq);
        Ok(update)
    }

    /// Aborts a request wherever it is, freeing its blocks at once. Also releases a retained KV.
    pub fn cancel(&mut self, id: RequestId) -> Result<SeqUpdate, LookupError> {
        let mut seq = self.seqs.remove(&id).ok_or(LookupError::Unknown(id))?;
        self.pool.free(id);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        if let Some(in_flight) = self.in_flight.as_mut() {
            in_flight.entries.retain(|(e, _)| *e != id);
        }
        let already_finished = matches!(seq.state, SequenceState::Finished(_));
        if !already_finished {
            self.finished_since_plan.push((id, FinishReason::Abort));
            self.stats.requests_finished_total.add(FinishReason::Abort);
        }
        seq.state = SequenceState::Finished(FinishReason::Abort);
        self.refresh_gauges();
        Ok(SeqUpdate {
            id,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text: None,
            finish: Some(Finish::new(FinishReason::Abort)),
            num_prompt_tokens: seq.prompt.len(),
            num_output_tokens: seq.output.len(),
            queue_time_ns: None,
        })
    }

    /// Frees the blocks of a finished request that retained its KV; returns the blocks freed.
    pub fn release_kv(&mut self, id: RequestId) -> Result<usize, LookupError> {
        let seq = self.seqs.get(&id).ok_or(LookupError::Unknown(id))?;
        if !matches!(seq.state, SequenceState::Finished(_)) {
            return Err(LookupError::NotFinished(id));
        }
        self.seqs.remove(&id);
        let freed = self.pool.free(id);
        self.refresh_gauges();
        Ok(freed)
    }

    /// Applies the executor's outputs for the plan in flight: appends accepted tokens, checks stop
    /// conditions, records speculative-decoding acceptance, frees finished sequences' blocks. An
    /// output that breaks the executor contract finishes its sequence with `error`.
    pub fn apply(&mut self, outputs: Vec<SeqOutput>) -> Result<Vec<SeqUpdate>, StepError> {
        let in_flight = self.in_flight.take().ok_or(StepError::NoStepInFlight)?;
        let mut by_id: HashMap<RequestId, Result<SeqOutput, String>> = HashMap::new();
        for out in outputs {
            let id = out.id;
            if by_id.insert(id, Ok(out)).is_some() {
                by_id.insert(
                    id,
                    Err("executor returned two outputs for one sequence".into()),
                );
            }
        }
        let mut updates = Vec::new();
        for (id, scheduled) in in_flight.entries {
            let out = by_id.remove(&id);
            if let Some(update) = self.apply_one(id, scheduled, out) {
                updates.push(update);
            }
        }
        self.stats.ignored_outputs_total += by_id.len() as u64;
        self.refresh_gauges();
        Ok(updates)
    }

    /// Finishes every sequence of the plan in flight with `error` (the executor failed the step).
    pub fn fail_step(&mut self, message: &str) -> Result<Vec<SeqUpdate>, StepError> {
        let in_flight = self.in_flight.take().ok_or(StepError::NoStepInFlight)?;
        let mut updates = Vec::new();
        for (id, _) in in_flight.entries {
            if let Some(seq) = self.seqs.get_mut(&id) {
                let finish = Finish::error(format!("step {} failed: {message}", in_flight.step_id));
                updates.push(make_update(seq, Vec::new(), Vec::new(), Some(finish)));
                self.finish(id, FinishReason::Error);
            }
        }
        self.refresh_gauges();
        Ok(updates)
    }

    fn apply_one(
        &mut self,
        id: RequestId,
        scheduled: Scheduled,
        out: Option<Result<SeqOutput, String>>,
    ) -> Option<SeqUpdate> {
        let spec_tokens = self.config.spec_tokens;
        let max_context = self.config.max_context_tokens;
        let seq = self.seqs.get_mut(&id)?;
        let checked = check_output(seq, scheduled, out, spec_tokens);
        let out = match checked {
            Ok(Some(out)) => out,
            Ok(None) => return None,
            Err(message) => {
                let update = make_update(seq, Vec::new(), Vec::new(), Some(Finish::error(message)));
                self.finish(id, FinishReason::Error);
                return Some(update);
            }
        };
        if let Scheduled::Decode { had_draft: true } = scheduled {
            let accepted = u64::from(out.tokens.len() == 2);
            self.stats.spec_drafts_total += 1;
            self.stats.spec_draft_tokens_total += 1;
            self.stats.spec_accepted_tokens_total += accepted;
            if let Some(pos0) = self.stats.spec_accepted_per_pos.first_mut() {
                *pos0 += accepted;
            }
        }
        let mut tokens = Vec::with_capacity(out.tokens.len());
        let mut finish = None;
        for &token in &out.tokens {
            seq.output.push(token);
            tokens.push(token);
            finish = seq
                .stop
                .check(token, seq.output.len(), seq.num_tokens(), max_context);
            if finish.is_some() {
                break;
            }
        }
        self.stats.generation_tokens_total += tokens.len() as u64;
        let mut logprobs = out.logprobs;
        logprobs.truncate(tokens.len());
        let mut top_logprobs = out.top_logprobs;
        top_logprobs.truncate(tokens.len());
        // The last token is the next input; everything before it is cached.
        seq.num_computed_tokens = seq.num_tokens() - 1;
        seq.phase = Phase::Decode;
        seq.draft = out.draft;
        let reason = finish.as_ref().map(|f| f.reason);
        let mut update = make_update(seq, tokens, logprobs, finish);
        update.top_logprobs = top_logprobs;
        if let Some(reason) = reason {
            self.finish(id, reason);
        }
        Some(update)
    }

    /// Marks a sequence finished: out of the running list; blocks freed unless retained.
    fn finish(&mut self, id: RequestId, reason: FinishReason) {
        self.running.retain(|&r| r != id);
        self.finished_since_plan.push((id, reason));
        self.stats.requests_finished_total.add(reason);
        let retain = self.seqs.get(&id).is_some_and(|s| s.retain_kv);
        if retain {
            // The pending draft stays: it travels with the retained KV (a prefill instance's MTP
            // draft for the decode instance's first step).
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.state = SequenceState::Finished(reason);
            }
        } else {
            self.seqs.remove(&id);
            self.pool.free(id);
        }
    }

    pub(crate) fn refresh_gauges(&mut self) {
        self.stats.num_running = self.running.len();
        self.stats.num_waiting = self.waiting.len();
        self.stats.num_retained = self
            .seqs
            .len()
            .saturating_sub(self.running.len() + self.waiting.len());
        self.stats.kv_blocks_used = self.pool.used_blocks();
    }

    /// Statistics after the last operation.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The configuration this state was built with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// A live (queued, running or retained) sequence.
    pub fn sequence(&self, id: RequestId) -> Option<&Sequence<P>> {
        self.seqs.get(&id)
    }

    /// The block table of `id` (empty if it holds no blocks).
    pub fn block_table(&self, id: RequestId) -> &[BlockId] {
        self.pool.table(id)
    }

    /// The block pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Queued request ids in FCFS order.
    pub fn waiting(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
    }

    /// Running request ids in FCFS order.
    pub fn running(&self) -> &[RequestId] {
        &self.running
    }

    /// Whether a step would have anything to do (queued or running sequences).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Whether a plan awaits `apply`.
    pub fn step_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Audits the invariants in the module docs; O(sequences^2 + blocks), for tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants().map_err(|e| e.to_string())?;
        let order = |id: &RequestId| self.seqs.get(id).map(|s| s.arrival_order);
        for (name, list) in [
            ("waiting", self.waiting.iter().collect::<Vec<_>>()),
            ("running", self.running.iter().collect()),
        ] {
            let orders: Vec<_> = list.iter().map(|id| order(id)).collect();
            if orders.iter().any(Option::is_none) {
                return Err(format!("{name} lists an unknown sequence"));
            }
            if orders.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("{name} is not in FCFS order"));
            }
        }
        for (&id, seq) in &self.seqs {
            let in_waiting = self.waiting.contains(&id);
            let in_running = self.running.contains(&id);
            let holds = !self.pool.table(id).is_empty();
            let ok = match seq.state {
                SequenceState::Waiting | SequenceState::Preempted => {
                    in_waiting && !in_running && !holds
                }
                SequenceState::Running => in_running && !in_waiting,
                SequenceState::Finished(_) => !in_waiting && !in_running && seq.retain_kv,
            };
            if !ok {
                return Err(format!(
                    "request {id} in state {:?}: waiting {in_waiting}, running {in_running}, holds blocks {holds}",
                    seq.state
                ));
            }
            if seq.num_computed_tokens > seq.num_tokens() {
                return Err(format!("request {id} computed more tokens than it has"));
            }
            if holds && self.pool.capacity_tokens(id) < seq.num_computed_tokens {
                return Err(format!("request {id} has computed KV beyond its blocks"));
            }
        }
        if self.waiting.len() + self.running.len() > self.seqs.len() {
            return Err("a sequence is listed twice".into());
        }
        let holders = self.pool.num_sequences();
        let allowed = self
            .seqs
            .values()
            .filter(|s| matches!(s.state, SequenceState::Running | SequenceState::Finished(_)))
            .count();
        if holders > allowed {
            return Err(format!(
                "{holders} sequences hold blocks but only {allowed} may"
            ));
        }
        Ok(())
    }
}

/// Validates one executor output against how its sequence was scheduled. `Ok(None)`: nothing to
/// apply beyond the computed-token count (already advanced for a non-sampling chunk).
fn check_output<P>(
    seq: &mut Sequence<P>,
    scheduled: Scheduled,
    out: Option<Result<SeqOutput, String>>,
    spec_tokens: usize,
) -> Result<Option<SeqOutput>, String> {
    let out = out.transpose()?;
    let max_tokens = match scheduled {
        Scheduled::Prefill { end, samples } => {
            seq.num_computed_tokens = end;
            if !samples {
                return match out {
                    Some(o) if !o.tokens.is_empty() => Err(
                        "executor returned tokens for a prefill chunk that does not sample".into(),
                    ),
                    _ => Ok(None),
                };
            }
            1
        }
        Scheduled::Decode { had_draft } => 1 + usize::from(had_draft),
    };
    let out = out.ok_or("executor returned no output for a sequence that needed a token")?;
    if out.tokens.is_empty() || out.tokens.len() > max_tokens {
        return Err(format!(
            "executor returned {} tokens, expected 1..={max_tokens}",
            out.tokens.len()
        ));
    }
    if out.tokens.len() == 2 && Some(out.tokens[0]) != seq.draft {
        return Err("executor accepted a token that is not the pending draft".into());
    }
    if !out.logprobs.is_empty() && out.logprobs.len() != out.tokens.len() {
        return Err(format!(
            "executor returned {} logprobs for {} tokens",
            out.logprobs.len(),
            out.tokens.len()
        ));
    }
    if !out.top_logprobs.is_empty() && out.top_logprobs.len() != out.tokens.len() {
        return Err(format!(
            "executor returned {} top-logprob lists for {} tokens",
            out.top_logprobs.len(),
            out.tokens.len()
        ));
    }
    if out.draft.is_some() && spec_tokens == 0 {
        return Err("executor returned a draft with speculative decoding off".into());
    }
    Ok(Some(out))
}

pub(crate) fn make_update<P>(
    seq: &mut Sequence<P>,
    tokens: Vec<TokenId>,
    logprobs: Vec<f32>,
    finish: Option<Finish>,
) -> SeqUpdate {
    let text = seq.stop.take_text(finish.is_some());
    let queue_time_ns = match (seq.queue_time_reported, seq.first_scheduled_ns) {
        (false, Some(at)) => {
            seq.queue_time_reported = true;
            Some(at.saturating_sub(seq.arrival_ns))
        }
        _ => None,
    };
    SeqUpdate {
        id: seq.id,
        tokens,
        logprobs,
        top_logprobs: Vec::new(),
        text,
        finish,
        num_prompt_tokens: seq.prompt.len(),
        num_output_tokens: seq.output.len(),
        queue_time_ns,
    }
}
