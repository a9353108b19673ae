//! [`StepDriver`]: one engine instance's loop body — plan, execute, price, apply, pace.
//!
//! `step(start_ns, now)` runs one step: `scheduler.step(start_ns)` → `executor.execute(&plan)` →
//! `clock.step_duration_ns(&plan, &routing)` → `state.apply(outputs)` → read `now()` as the real end
//! of compute (and once after execution, to split model time from pricing) →
//! `pacer.pace(start, sim, real_end)`. The returned [`StepReport`] says when to release
//! the updates (`pace.release_ns`, i.e. wait `pace.wait_ns` after the real end) and how late the
//! host was (`pace.lag_ns`, also accumulated in the [`Pacer`]): a step whose compute outlasts its
//! scaled simulated duration is released at once and its lag is counted, never hidden.
//!
//! The driver reads no clock itself: the caller passes the step's start and a function returning
//! the current time on the same monotonic clock (a test passes a fake one), and does the waiting.
//! An executor failure fails the step's sequences ([`EngineState::fail_step`]) and is reported in
//! [`StepReport::error`]; the loop goes on.

use crate::executor::{Executor, StepClock};
use crate::pacing::{Pace, Pacer};
use crate::scheduler::Scheduler;
use crate::state::{EngineState, SeqUpdate, StepError};

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The plan's step id.
    pub step_id: u64,
    /// Nothing was planned.
    pub idle: bool,
    /// Decodes in the step.
    pub num_decodes: usize,
    /// Decodes that verified a draft.
    pub num_drafts: usize,
    /// Prefill chunk tokens in the step.
    pub num_prefill_tokens: usize,
    /// Tokens planned (the scheduler's budget units).
    pub num_batched_tokens: usize,
    /// Output tokens released by the step.
    pub num_output_tokens: usize,
    /// Simulated duration, ns (unscaled).
    pub sim_ns: u64,
    /// Real time from the step's start to the end of the model's execution (planning included), ns.
    pub execute_ns: u64,
    /// Real time from the step's start to the end of compute (pricing and applying included), ns.
    pub real_ns: u64,
    /// Release time, wait and lag.
    pub pace: Pace,
    /// Updates to stream at `pace.release_ns`.
    pub updates: Vec<SeqUpdate>,
    /// The executor's error when the step failed.
    pub error: Option<String>,
}

/// An engine instance: scheduler, state, executor, clock and pacer.
#[derive(Debug)]
pub struct StepDriver<P, E, C> {
    scheduler: Scheduler,
    state: EngineState<P>,
    executor: E,
    clock: C,
    pacer: Pacer,
}

impl<P, E, C> StepDriver<P, E, C>
where
    P: Clone,
    E: Executor<P>,
    C: StepClock<P, E::Routing>,
{
    /// A driver with an empty state.
    pub fn new(scheduler: Scheduler, executor: E, clock: C, pacer: Pacer) -> Self {
        Self {
            state: scheduler.new_state(),
            scheduler,
            executor,
            clock,
            pacer,
        }
    }

    /// The engine state (add and cancel requests here between steps).
    pub fn state_mut(&mut self) -> &mut EngineState<P> {
        &mut self.state
    }

    /// The engine state.
    pub fn state(&self) -> &EngineState<P> {
        &self.state
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// The executor, mutably (to stage arrived KV).
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.executor
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The clock, mutably (to record a trace).
    pub fn clock_mut(&mut self) -> &mut C {
        &mut self.clock
    }

    /// The pacer (accumulated lag).
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// Runs one step that starts at `start_ns`; `now` returns the current time on the same clock.
    pub fn step(
        &mut self,
        start_ns: u64,
        now: &mut dyn FnMut() -> u64,
    ) -> Result<StepReport, StepError> {
        let plan = self.scheduler.step(start_ns, &mut self.state)?;
        let executed = self.executor.execute(&plan);
        let execute_end_ns = now();
        let (updates, sim_ns, error) = match executed {
            Ok(out) => {
                let sim_ns = self.clock.step_duration_ns(&plan, &out.routing);
                (self.state.apply(out.seqs)?, sim_ns, None)
            }
            Err(e) => {
                let message = e.to_string();
                (self.state.fail_step(&message)?, 0, Some(message))
            }
        };
        let real_end_ns = now();
        let pace = self.pacer.pace(start_ns, sim_ns, real_end_ns);
        Ok(StepReport {
            step_id: plan.step_id,
            idle: plan.is_idle(),
            num_decodes: plan.decodes.len(),
            num_drafts: plan
                .decodes
                .iter()
                .filter(|d| d.draft_token.is_some())
                .count(),
            num_prefill_tokens: plan.prefills.iter().map(|c| c.tokens.len()).sum(),
            num_batched_tokens: plan.num_batched_tokens,
            num_output_tokens: updates.iter().map(|u| u.tokens.len()).sum(),
            sim_ns,
            execute_ns: execute_end_ns.saturating_sub(start_ns),
            real_ns: real_end_ns.saturating_sub(start_ns),
            pace,
            updates,
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::executor::{LinearStepClock, ScriptedExecutor};
    use crate::sequence::{Request, RequestId};
    use crate::stop::StopConditions;

    fn driver(time_scale: f64) -> StepDriver<(), ScriptedExecutor, LinearStepClock> {
        let scheduler = Scheduler::new(SchedulerConfig {
            num_kv_blocks: 16,
            max_context_tokens: 512,
            ..SchedulerConfig::default()
        })
        .unwrap();
        let mut d = StepDriver::new(
            scheduler,
            ScriptedExecutor::new(100),
            LinearStepClock {
                base_ns: 1_000_000,
                per_token_ns: 0,
            },
            Pacer::new(time_scale).unwrap(),
        );
        let stop = StopConditions {
            max_tokens: Some(3),
            ..StopConditions::default()
        };
        d.state_mut()
            .add_request(Request::new(RequestId(1), vec![5, 6], ()).with_stop(stop))
            .unwrap();
        d
    }

    #[test]
    fn fast_compute_waits_for_the_simulated_duration() {
        let mut d = driver(2.0);
        // Compute takes 0.5 ms of a 1 ms x 2 budget: wait 1.5 ms, no lag.
        let r = d.step(10_000_000, &mut || 10_500_000).unwrap();
        assert_eq!(r.sim_ns, 1_000_000);
        assert_eq!(r.pace.release_ns, 12_000_000);
        assert_eq!((r.pace.wait_ns, r.pace.lag_ns), (1_500_000, 0));
        assert_eq!(r.num_output_tokens, 1);
    }

    #[test]
    fn slow_compute_is_released_late_and_its_lag_counted() {
        let mut d = driver(1.0);
        let mut t = 0u64;
        let mut total_lag = 0;
        while d.state().has_work() {
            // Every step computes for 3 ms (1.5 ms executing, 1.5 ms pricing and applying) against
            // a 1 ms simulated duration: 2 ms late.
            let r = d
                .step(t, &mut || {
                    t += 1_500_000;
                    t
                })
                .unwrap();
            assert_eq!((r.execute_ns, r.real_ns), (1_500_000, 3_000_000));
            assert_eq!(r.pace.lag_ns, 2_000_000);
            total_lag += r.pace.lag_ns;
            t = r.pace.release_ns;
        }
        assert_eq!(d.pacer().lag_ns_total(), total_lag);
        assert_eq!(d.pacer().late_steps_total(), 3);
    }
}
