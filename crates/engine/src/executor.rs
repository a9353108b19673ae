//! Seams where the model and the fabric plug in: [`Executor`] runs a [`StepPlan`], [`StepClock`]
//! prices it in simulated time.
//!
//! The engine loop (one task owns the state; see the crate docs) is:
//! `plan = scheduler.step(now)` → write `plan.kv_loads` → `out = executor.execute(&plan)` →
//! `sim_ns = clock.step_duration_ns(&plan, &out.routing)?` → `updates = state.apply(out.seqs)` →
//! `pacer.pace(start, sim_ns, real_end)` → stream `updates` at the release time.
//!
//! Output contract of an executor, per sequence of the plan (checked by `apply`; a violation finishes
//! that sequence with `error`, never panics):
//! - a prefill chunk that does not sample: no output, or one with no tokens;
//! - a sampling prefill chunk: exactly one token;
//! - a decode without a draft: exactly one token; with a draft `d`: `[t]` if the model's token `t` at
//!   the input position differs from `d`, or `[d, t2]` if it equals `d`, `t2` being the model's token
//!   after `d`;
//! - `logprobs` and `top_logprobs` each empty or one per token; `draft` only when `plan.spec_tokens > 0`: the MTP proposal
//!   for the token after the last one returned.
//!
//! [`ScriptedExecutor`] and [`LinearStepClock`] are the stand-ins used by tests and by examples.

use std::convert::Infallible;

use crate::plan::StepPlan;
use crate::sequence::{RequestId, TokenId};

/// What the executor produced for one sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqOutput {
    /// The sequence.
    pub id: RequestId,
    /// Accepted tokens, in order (see the module docs).
    pub tokens: Vec<TokenId>,
    /// Log-probability of each token, or empty.
    pub logprobs: Vec<f32>,
    /// The most likely alternatives of each token (id, logprob; best first), or empty; one entry
    /// per token when present.
    pub top_logprobs: Vec<Vec<(TokenId, f32)>>,
    /// Draft for the token after the last of `tokens` (speculative decoding).
    pub draft: Option<TokenId>,
}

/// Everything one executed step returns.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutputs<R> {
    /// One entry per sequence that produced tokens.
    pub seqs: Vec<SeqOutput>,
    /// The step's routing trace (expert choices per layer and token), for the fabric's cost model.
    pub routing: R,
}

/// Runs a step's batch on a model. `P` is the sampling parameters type.
pub trait Executor<P> {
    /// The routing trace the model reports (defined by the model crate).
    type Routing;
    /// Failure of the whole step; the driver then calls
    /// [`EngineState::fail_step`](crate::EngineState::fail_step).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs `plan` (after its `kv_loads` were written) and returns per-sequence outputs.
    fn execute(&mut self, plan: &StepPlan<P>) -> Result<StepOutputs<Self::Routing>, Self::Error>;
}

/// Prices a step in simulated time (the fabric's cost model and timeline implement it).
pub trait StepClock<P, R> {
    /// Why a step could not be priced; the driver then fails the step
    /// ([`EngineState::fail_step`](crate::EngineState::fail_step)): a step is never released
    /// with a made-up duration.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Simulated duration of `plan` given its routing trace, in ns.
    fn step_duration_ns(&mut self, plan: &StepPlan<P>, routing: &R) -> Result<u64, Self::Error>;
}

/// A step clock linear in the batch: `base_ns + per_token_ns * num_batched_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearStepClock {
    /// Fixed cost of a non-idle step.
    pub base_ns: u64,
    /// Cost per planned token.
    pub per_token_ns: u64,
}

impl<P, R> StepClock<P, R> for LinearStepClock {
    type Error = Infallible;

    fn step_duration_ns(&mut self, plan: &StepPlan<P>, _routing: &R) -> Result<u64, Infallible> {
        if plan.is_idle() {
            return Ok(0);
        }
        Ok(self.base_ns.saturating_add(
            self.per_token_ns
                .saturating_mul(plan.num_batched_tokens as u64),
        ))
    }
}

/// A deterministic stand-in model: the token at output index `k` of request `id` is fixed (a script,
/// or a hash of `(id, k)`), so output does not depend on batching, preemption or speculation. With
/// speculative decoding its drafts are right except for a deterministic pseudo-random one in
/// `reject_every` (output index, request) pairs, so tests control the acceptance rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptedExecutor {
    /// Tokens are in `0..vocab_size` (at least 2).
    pub vocab_size: u32,
    /// Draft for output index `k` of request `id` is wrong when `mix(id, k) % n == 0` (about one in
    /// `n`, not aligned with any stride); `None`: always right.
    pub reject_every: Option<u64>,
    /// Per-request token scripts (index `k` overrides the hash while `k < len`).
    scripts: Vec<(RequestId, Vec<TokenId>)>,
    /// Steps executed.
    pub steps_executed: u64,
}

impl ScriptedExecutor {
    /// Hash tokens over `vocab_size` (clamped to at least 2), drafts always right.
    pub fn new(vocab_size: u32) -> Self {
        Self {
            vocab_size: vocab_size.max(2),
            reject_every: None,
            scripts: Vec::new(),
            steps_executed: 0,
        }
    }

    /// Makes about one draft in `n` wrong (see the field).
    pub fn with_reject_every(mut self, n: u64) -> Self {
        self.reject_every = Some(n.max(1));
        self
    }

    /// Fixes the first tokens of `id`'s output.
    pub fn with_script(mut self, id: RequestId, tokens: Vec<TokenId>) -> Self {
        self.scripts.retain(|(s, _)| *s != id);
        self.scripts.push((id, tokens));
        self
    }

    /// The model's token at output index `k` of `id`.
    pub fn token(&self, id: RequestId, k: usize) -> TokenId {
        if let Some(t) = self
            .scripts
            .iter()
            .find(|(s, _)| *s == id)
            .and_then(|(_, script)| script.get(k))
        {
            return *t;
        }
        (mix(id, k, 0) % u64::from(self.vocab_size)) as TokenId
    }

    /// The draft proposed for output index `k` of `id`.
    pub fn draft(&self, id: RequestId, k: usize) -> TokenId {
        let right = self.token(id, k);
        let wrong = self
            .reject_every
            .is_some_and(|n| mix(id, k, 1).is_multiple_of(n));
        if wrong {
            (right + 1) % self.vocab_size
        } else {
            right
        }
    }

    fn logprob(k: usize) -> f32 {
        -1.0 / (k as f32 + 1.0)
    }
}

/// A splitmix64-style hash of `(id, k, salt)`.
fn mix(id: RequestId, k: usize, salt: u64) -> u64 {
    let mut h =
        id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(salt.wrapping_mul(0x94D0_49BB_1331_11EB));
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl<P> Executor<P> for ScriptedExecutor {
    type Routing = ();
    type Error = Infallible;

    fn execute(&mut self, plan: &StepPlan<P>) -> Result<StepOutputs<()>, Infallible> {
        self.steps_executed += 1;
        let spec = plan.spec_tokens > 0;
        let mut seqs = Vec::with_capacity(plan.num_sequences());
        for chunk in plan.prefills.iter().filter(|c| c.samples) {
            let k = chunk.num_output_tokens;
            seqs.push(SeqOutput {
                id: chunk.id,
                tokens: vec![self.token(chunk.id, k)],
                logprobs: vec![Self::logprob(k)],
                top_logprobs: Vec::new(),
                draft: spec.then(|| self.draft(chunk.id, k + 1)),
            });
        }
        for item in &plan.decodes {
            let k = item.num_output_tokens;
            let t = self.token(item.id, k);
            let tokens = match item.draft_token {
                Some(d) if d == t => vec![t, self.token(item.id, k + 1)],
                _ => vec![t],
            };
            let next = k + tokens.len();
            seqs.push(SeqOutput {
                id: item.id,
                logprobs: (k..next).map(Self::logprob).collect(),
                top_logprobs: Vec::new(),
                tokens,
                draft: spec.then(|| self.draft(item.id, next)),
            });
        }
        Ok(StepOutputs { seqs, routing: () })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_tokens_are_deterministic_and_in_vocab() {
        let e = ScriptedExecutor::new(50).with_script(RequestId(3), vec![7, 8]);
        assert_eq!((e.token(RequestId(3), 0), e.token(RequestId(3), 1)), (7, 8));
        for k in 0..100 {
            assert!(e.token(RequestId(9), k) < 50);
            assert_eq!(e.token(RequestId(9), k), e.token(RequestId(9), k));
        }
    }

    #[test]
    fn about_one_draft_in_reject_every_is_wrong_on_any_stride() {
        let e = ScriptedExecutor::new(50).with_reject_every(4);
        // Even indices only (the stride of a sequence whose drafts keep being accepted).
        let wrong = (0..40u64)
            .flat_map(|id| (0..100).map(move |k| (RequestId(id), 2 * k)))
            .filter(|&(id, k)| e.draft(id, k) != e.token(id, k))
            .count();
        assert!(
            (800..1200).contains(&wrong),
            "{wrong} of 4000 wrong, expected ~1000"
        );
        let always = ScriptedExecutor::new(50);
        assert!((0..100).all(|k| always.draft(RequestId(1), k) == always.token(RequestId(1), k)));
    }

    #[test]
    fn linear_clock_charges_base_plus_tokens_and_nothing_when_idle() {
        let mut plan: StepPlan<()> = StepPlan {
            step_id: 0,
            now_ns: 0,
            spec_tokens: 0,
            kv_loads: vec![],
            prefills: vec![],
            decodes: vec![],
            preempted: vec![],
            finished: vec![],
            num_batched_tokens: 0,
            micro_batch_work: None,
        };
        let mut clock = LinearStepClock {
            base_ns: 1_000,
            per_token_ns: 10,
        };
        assert_eq!(clock.step_duration_ns(&plan, &()), Ok(0));
        plan.decodes.push(crate::plan::DecodeItem {
            id: RequestId(1),
            input_token: 0,
            draft_token: None,
            position: 5,
            num_output_tokens: 1,
            block_table: vec![],
            params: (),
            micro_batch: 0,
        });
        plan.num_batched_tokens = 3;
        assert_eq!(clock.step_duration_ns(&plan, &()), Ok(1_030));
    }
}
