//! The scheduler: a pure decision step over [`EngineState`].
//!
//! [`Scheduler::step`] plans one step of continuous batching. It reads no clock (`now_ns` is an
//! argument, used for queue-time accounting), does no I/O and draws no randomness: the same state and
//! inputs give the same plan. The policy, in order:
//!
//! 1. **Running sequences, oldest first.** A decoding sequence costs `1 + spec_tokens` tokens of the
//!    step budget and needs KV slots for `num_tokens + spec_tokens` (its input plus a draft slot); a
//!    prefilling one takes a chunk of `min(remaining, prefill_chunk_tokens, budget left)` tokens. When
//!    the pool cannot cover a sequence's slots, the *newest* running sequence is preempted (possibly
//!    the sequence itself) until it can: its blocks are freed and it is requeued ahead of every
//!    request that arrived after it, to recompute the KV of `prompt ++ output` (a request whose KV had
//!    arrived from a prefill instance is recomputed from its tokens too). Sequences the budget cannot
//!    cover this step simply wait for the next.
//! 2. **Waiting requests, FCFS**, unless this step preempted (memory is tight: admitting would only
//!    evict again), while the running count is below `max_running_seqs` and budget is left: a request that computes its prompt is admitted with its first chunk; one whose KV arrived
//!    needs slots for `prompt + 1 + spec_tokens` and decodes in the same step (the plan lists its
//!    `kv_loads`). The queue head that does not fit stops admission (no overtaking, no preemption for
//!    admission), so it is admitted as soon as room frees.
//! 3. With two-batch overlap on, the batch is split into two micro-batches of balanced work.
//!
//! Invariants: the planned tokens never exceed `max_batched_tokens`; the oldest running sequence
//! always gets its blocks (the config guarantees one full context fits the pool), so every request
//! finishes, is cancelled, or is rejected up front; nothing is ever lost by preemption (its output is
//! kept and not re-streamed).

use crate::config::{ConfigError, SchedulerConfig};
use crate::microbatch::{WorkItem, split_two};
use crate::plan::{DecodeItem, KvLoad, PrefillChunk, StepPlan};
use crate::sequence::{Phase, RequestId, Sequence, SequenceState};
use crate::state::{EngineState, InFlight, Scheduled, StepError};

/// The scheduling policy; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduler {
    config: SchedulerConfig,
}

/// What one sequence needs this step.
#[derive(Clone, Copy, Debug)]
struct Demand {
    kind: Scheduled,
    /// Budget tokens it uses.
    tokens: usize,
    /// KV slots its blocks must cover.
    kv_tokens: usize,
}

/// A plan under construction.
#[derive(Debug)]
struct Builder<P> {
    budget: usize,
    entries: Vec<(RequestId, Scheduled)>,
    kv_loads: Vec<KvLoad>,
    prefills: Vec<PrefillChunk<P>>,
    decodes: Vec<DecodeItem<P>>,
    preempted: Vec<RequestId>,
    batched: usize,
}

impl Scheduler {
    /// A scheduler for a validated `config`.
    pub fn new(config: SchedulerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// An empty engine state (pool, queues, statistics) for this configuration.
    pub fn new_state<P>(&self) -> EngineState<P> {
        EngineState::new(self.config)
    }

    /// Plans one step and marks it in flight; see the module docs. Call
    /// [`EngineState::apply`] (or [`EngineState::fail_step`]) with its results before the next step,
    /// even for an idle plan.
    pub fn step<P: Clone>(
        &self,
        now_ns: u64,
        state: &mut EngineState<P>,
    ) -> Result<StepPlan<P>, StepError> {
        if let Some(in_flight) = &state.in_flight {
            return Err(StepError::StepInFlight {
                step_id: in_flight.step_id,
            });
        }
        if state.config != self.config {
            return Err(StepError::ConfigMismatch);
        }
        let mut b = Builder {
            budget: self.config.max_batched_tokens,
            entries: Vec::new(),
            kv_loads: Vec::new(),
            prefills: Vec::new(),
            decodes: Vec::new(),
            preempted: Vec::new(),
            batched: 0,
        };
        self.schedule_running(now_ns, state, &mut b)?;
        // Memory is tight when this step had to preempt: admitting now would only evict again.
        if b.preempted.is_empty() {
            self.schedule_waiting(now_ns, state, &mut b)?;
        }

        let micro_batch_work = self.config.two_batch_overlap.map(|weights| {
            let items: Vec<WorkItem> = b
                .prefills
                .iter()
                .map(|c| {
                    WorkItem::causal(c.start_pos as u64, (c.start_pos + c.tokens.len()) as u64)
                })
                .chain(b.decodes.iter().map(|d| {
                    WorkItem::causal(
                        d.position as u64,
                        (d.position + d.num_query_tokens()) as u64,
                    )
                }))
                .collect();
            let split = split_two(&items, &weights);
            let (pre, dec) = split.assignment.split_at(b.prefills.len());
            for (chunk, &mb) in b.prefills.iter_mut().zip(pre) {
                chunk.micro_batch = mb;
            }
            for (item, &mb) in b.decodes.iter_mut().zip(dec) {
                item.micro_batch = mb;
            }
            split.work
        });

        let step_id = state.next_step_id;
        state.next_step_id += 1;
        let plan = StepPlan {
            step_id,
            now_ns,
            spec_tokens: self.config.spec_tokens,
            kv_loads: b.kv_loads,
            prefills: b.prefills,
            decodes: b.decodes,
            preempted: b.preempted,
            finished: std::mem::take(&mut state.finished_since_plan),
            num_batched_tokens: b.batched,
            micro_batch_work,
        };
        if !plan.is_idle() {
            state.stats.steps_total += 1;
            state.stats.batched_tokens_total += b.batched as u64;
        }
        state.in_flight = Some(InFlight {
            step_id,
            entries: b.entries,
        });
        state.refresh_gauges();
        Ok(plan)
    }

    /// What `seq` needs this step with `budget` tokens left, if the budget allows any work.
    fn demand<P>(&self, seq: &Sequence<P>, budget: usize) -> Option<Demand> {
        let spec = self.config.spec_tokens;
        match seq.phase {
            Phase::Decode => (budget > spec).then(|| Demand {
                kind: Scheduled::Decode {
                    had_draft: spec > 0 && seq.draft.is_some(),
                },
                tokens: 1 + spec,
                kv_tokens: seq.num_tokens() + spec,
            }),
            Phase::Prefill => {
                let start = seq.num_computed_tokens;
                let total = seq.num_tokens();
                let chunk = (total - start)
                    .min(self.config.prefill_chunk_tokens)
                    .min(budget);
                (chunk > 0).then(|| Demand {
                    kind: Scheduled::Prefill {
                        end: start + chunk,
                        samples: start + chunk == total,
                    },
                    tokens: chunk,
                    kv_tokens: start + chunk,
                })
            }
        }
    }

    fn schedule_running<P: Clone>(
        &self,
        now_ns: u64,
        state: &mut EngineState<P>,
        b: &mut Builder<P>,
    ) -> Result<(), StepError> {
        let mut i = 0;
        while i < state.running.len() {
            let id = state.running[i];
            let Some(seq) = state.seqs.get(&id) else {
                // Unreachable while the invariants hold; never schedule a ghost.
                state.running.remove(i);
                continue;
            };
            let Some(demand) = self.demand(seq, b.budget) else {
                i += 1;
                continue;
            };
            let mut preempted_self = false;
            while !state.pool.can_reserve(id, demand.kv_tokens) {
                let Some(&victim) = state.running.last() else {
                    break;
                };
                preempt(state, victim, b);
                if victim == id {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                continue;
            }
            state.pool.reserve(id, demand.kv_tokens)?;
            self.add(now_ns, state, id, demand, b);
            i += 1;
        }
        Ok(())
    }

    fn schedule_waiting<P: Clone>(
        &self,
        now_ns: u64,
        state: &mut EngineState<P>,
        b: &mut Builder<P>,
    ) -> Result<(), StepError> {
        while let Some(&id) = state.waiting.front() {
            if state.running.len() >= self.config.max_running_seqs {
                break;
            }
            let Some(seq) = state.seqs.get(&id) else {
                state.waiting.pop_front();
                continue;
            };
            let Some(demand) = self.demand(seq, b.budget) else {
                break;
            };
            if !state.pool.can_reserve(id, demand.kv_tokens) {
                break;
            }
            let order = seq.arrival_order;
            state.waiting.pop_front();
            state.pool.reserve(id, demand.kv_tokens)?;
            let at = state
                .running
                .partition_point(|r| state.seqs.get(r).is_some_and(|s| s.arrival_order < order));
            state.running.insert(at, id);
            if let Some(seq) = state.seqs.get_mut(&id) {
                seq.state = SequenceState::Running;
            }
            self.add(now_ns, state, id, demand, b);
        }
        Ok(())
    }

    /// Puts `id` (blocks already reserved) into the plan.
    fn add<P: Clone>(
        &self,
        now_ns: u64,
        state: &mut EngineState<P>,
        id: RequestId,
        demand: Demand,
        b: &mut Builder<P>,
    ) {
        let table = state.pool.table(id).to_vec();
        let Some(seq) = state.seqs.get_mut(&id) else {
            return;
        };
        seq.first_scheduled_ns.get_or_insert(now_ns);
        match demand.kind {
            Scheduled::Decode { had_draft } => {
                if seq.kv_pending {
                    seq.kv_pending = false;
                    b.kv_loads.push(KvLoad {
                        id,
                        num_tokens: seq.num_computed_tokens,
                        block_table: table.clone(),
                    });
                }
                b.decodes.push(DecodeItem {
                    id,
                    // The prompt is never empty, so there is always a last token.
                    input_token: seq.last_token().unwrap_or_default(),
                    draft_token: if had_draft { seq.draft } else { None },
                    position: seq.num_computed_tokens,
                    num_output_tokens: seq.output.len(),
                    block_table: table,
                    params: seq.params.clone(),
                    micro_batch: 0,
                });
            }
            Scheduled::Prefill { end, samples } => {
                let start = seq.num_computed_tokens;
                state.stats.prefill_tokens_total += (end - start) as u64;
                b.prefills.push(PrefillChunk {
                    id,
                    tokens: seq.tokens(start, end),
                    start_pos: start,
                    samples,
                    num_output_tokens: seq.output.len(),
                    block_table: table,
                    params: seq.params.clone(),
                    micro_batch: 0,
                });
            }
        }
        b.entries.push((id, demand.kind));
        b.budget -= demand.tokens;
        b.batched += demand.tokens;
    }
}

/// Evicts the running sequence `victim`: frees its blocks and requeues it, ahead of every request that
/// arrived after it, to recompute `prompt ++ output`.
fn preempt<P>(state: &mut EngineState<P>, victim: RequestId, b: &mut Builder<P>) {
    state.running.retain(|&r| r != victim);
    state.pool.free(victim);
    let Some(seq) = state.seqs.get_mut(&victim) else {
        return;
    };
    seq.state = SequenceState::Preempted;
    seq.phase = Phase::Prefill;
    seq.num_computed_tokens = 0;
    seq.draft = None;
    seq.kv_pending = false;
    seq.num_preemptions += 1;
    let order = seq.arrival_order;
    let at = state
        .waiting
        .partition_point(|w| state.seqs.get(w).is_some_and(|s| s.arrival_order < order));
    state.waiting.insert(at, victim);
    state.stats.preemptions_total += 1;
    b.preempted.push(victim);
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
