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
//! An executor failure, or a clock that cannot price the executed step, fails the step's sequences
//! ([`EngineState::fail_step`]: each finishes with `error`) and is reported in
//! [`StepReport::error`] (`sim_ns` is then 0: nothing is released at a made-up time); the loop
//! goes on. The driver writes no log: the caller logs the report's error.

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
    /// Why the step failed: the executor's error, or `clock: …` when the executed step could not
    /// be priced.
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
        let priced = executed.map_err(|e| e.to_string()).and_then(|out| {
            match self.clock.step_duration_ns(&plan, &out.routing) {
                Ok(sim_ns) => Ok((out, sim_ns)),
                Err(e) => Err(format!("clock: {e}")),
            }
        });
        let (updates, sim_ns, error) = match priced {
            Ok((out, sim_ns)) => (self.state.apply(out.seqs)?, sim_ns, None),
            Err(message) => (self.state.fail_step(&message)?, 0, Some(message)),
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
    use crate::plan::StepPlan;
    use crate::sequence::{Request, RequestId};
    use crate::stop::{FinishReason, StopConditions};

    fn driver(time_scale: f64) -> StepDriver<(), ScriptedExecutor, LinearStepClock> {
        let clock = LinearStepClock {
            base_ns: 1_000_000,
            per_token_ns: 0,
        };
        driver_with(time_scale, clock)
    }

    /// A driver with request 1 (prompt of 2, 3 tokens out) priced by `clock`.
    fn driver_with<C: StepClock<(), ()>>(
        time_scale: f64,
        clock: C,
    ) -> StepDriver<(), ScriptedExecutor, C> {
        let scheduler = Scheduler::new(SchedulerConfig {
            num_kv_blocks: 16,
            max_context_tokens: 512,
            ..SchedulerConfig::default()
        })
        .unwrap();
        let mut d = StepDriver::new(
            scheduler,
            ScriptedExecutor::new(100),
            clock,
            Pacer::new(time_scale).unwrap(),
        );
        add(&mut d, 1);
        d
    }

    fn add<C: StepClock<(), ()>>(d: &mut StepDriver<(), ScriptedExecutor, C>, id: u64) {
        let stop = StopConditions {
            max_tokens: Some(3),
            ..StopConditions::default()
        };
        d.state_mut()
            .add_request(Request::new(RequestId(id), vec![5, 6], ()).with_stop(stop))
            .unwrap();
    }

    /// Why [`RefusingClock`] refused.
    #[derive(Debug, thiserror::Error)]
    #[error("step {0} cannot be priced")]
    struct Unpriceable(u64);

    /// 1 ms per step, except step `refuse`, which it cannot price.
    struct RefusingClock {
        refuse: u64,
    }

    impl StepClock<(), ()> for RefusingClock {
        type Error = Unpriceable;

        fn step_duration_ns(&mut self, plan: &StepPlan<()>, _: &()) -> Result<u64, Unpriceable> {
            if plan.step_id == self.refuse {
                return Err(Unpriceable(plan.step_id));
            }
            Ok(1_000_000)
        }
    }

    #[test]
    fn a_step_the_clock_cannot_price_fails_its_requests_and_the_loop_goes_on() {
        let mut d = driver_with(1.0, RefusingClock { refuse: 1 });
        let first = d.step(0, &mut || 100).unwrap();
        assert_eq!((first.num_output_tokens, first.sim_ns), (1, 1_000_000));
        // Step 1 runs request 1's decode but cannot be priced: the request fails, nothing is
        // released with a made-up duration.
        let failed = d.step(2_000_000, &mut || 2_000_100).unwrap();
        assert_eq!(
            failed.error.as_deref(),
            Some("clock: step 1 cannot be priced")
        );
        assert_eq!((failed.sim_ns, failed.pace.wait_ns), (0, 0));
        assert_eq!(failed.updates.len(), 1);
        let update = &failed.updates[0];
        assert!(update.tokens.is_empty());
        let finish = update.finish.as_ref().unwrap();
        assert_eq!(finish.reason, FinishReason::Error);
        assert!(
            finish
                .message
                .as_deref()
                .is_some_and(|m| m.contains("cannot be priced")),
            "{finish:?}"
        );
        assert_eq!(d.state().stats().requests_finished_total.error, 1);
        // The next request is served and priced normally.
        add(&mut d, 2);
        let next = d.step(3_000_000, &mut || 3_000_100).unwrap();
        assert_eq!((next.error, next.sim_ns), (None, 1_000_000));
        assert_eq!(next.num_output_tokens, 1);
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
