//! Traffic plans built ahead of the step executor, on worker threads.
//!
//! A plan is a pure function of (routing, placement, token ranges) — never of simulated time — so
//! a step's plans can be built before the executor reaches them. [`PlanBuilder`] builds the plan
//! of one slot (routing layer × micro-batch) and its MLP durations; [`PlanSource`] hands them to
//! the executor, either built on its own thread when first needed ([`PlanSource::Inline`]) or
//! received from workers that build them ahead ([`PlanSource::spawn`]).
//!
//! Determinism: the slots are split over the workers by a fixed rule (round-robin over the
//! executor's first-use order), each worker builds its slots in that order, and the executor
//! takes each slot's result (plan or error) when it needs it, whatever thread built it and
//! whenever it arrived. So the outcome, the trace and the first error are the same for any
//! thread count. A worker starts a plan only while it is fewer than [`AHEAD`] plans per worker
//! ahead of the executor, so memory stays at a few plans per worker. Waiting is by condition
//! variables (no spinning: on a host with few cores a spinning waiter takes the core a builder
//! needs).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::Scope;

use crate::error::FabricError;
use crate::fabric::{Fabric, Mode};
use crate::plan::TrafficPlan;
use crate::step::StepInput;

/// Plans per worker that may be built ahead of the executor.
pub(crate) const AHEAD: usize = 2;

/// A slot's plan and the MLP duration of each GPU under it.
pub(crate) type Built = (TrafficPlan, Vec<f64>);

/// Builds the plan of a slot: routing index `slot / mbs`, micro-batch `slot % mbs`.
#[derive(Clone)]
pub(crate) struct PlanBuilder<'f, 'i> {
    pub(crate) fabric: &'f Fabric,
    pub(crate) input: &'i StepInput<'i>,
    /// Token ranges of each micro-batch on each rank.
    pub(crate) ranges: Vec<Vec<(usize, usize)>>,
    pub(crate) mbs: usize,
}

impl PlanBuilder<'_, '_> {
    pub(crate) fn build(&self, slot: usize) -> Result<Built, FabricError> {
        let (r, mb) = (slot / self.mbs, slot % self.mbs);
        let input = self.input;
        let (routing, origin) = match input.routing.get(r) {
            Some(routing) => (routing, format!("routing[{r}]")),
            None => match input.mtp_routing {
                Some(routing) => (routing, "mtp_routing".to_string()),
                None => {
                    return Err(FabricError::invalid(
                        "routing",
                        "layers",
                        "no routing for the MTP layer",
                    ));
                }
            },
        };
        let placement = &input.placements[if input.placements.len() == 1 { 0 } else { r }];
        let ranges = self.ranges.get(mb).ok_or_else(|| {
            FabricError::invalid("step", "schedule", "names a micro-batch the batch lacks")
        })?;
        let plan = self.fabric.plan(placement, routing, ranges, &origin)?;
        let mlp = mlp_durations(self.fabric, &plan, input);
        Ok((plan, mlp))
    }
}

fn mlp_durations(fabric: &Fabric, plan: &TrafficPlan, input: &StepInput<'_>) -> Vec<f64> {
    if fabric.mode == Mode::Analysis {
        return vec![0.0; plan.num_gpus()];
    }
    let c = &fabric.cost;
    plan.pairs
        .iter()
        .zip(&plan.active_experts)
        .map(|(&p, &a)| c.time_us(&c.routed_experts(u64::from(p), u64::from(a)), input.phase))
        .collect()
}

/// What the executor and the workers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when a result is stored (the executor waits).
    stored: Condvar,
    /// Signalled when the executor takes a plan or stops (workers wait).
    taken: Condvar,
}

pub(crate) struct State {
    /// Results not yet taken, by slot.
    results: Vec<Option<Result<Built, FabricError>>>,
    /// Plans the executor has taken (from workers or built itself).
    taken: usize,
    /// The executor has finished: workers stop.
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the executor takes its plans from.
pub(crate) enum PlanSource {
    /// Built on the executor's thread when first needed.
    Inline,
    /// Built ahead by workers.
    Workers {
        shared: Arc<Shared>,
        /// Position of each slot in the first-use order (`usize::MAX`: not in it).
        position: Vec<usize>,
        /// Plans that may be built ahead of the executor in all.
        window: usize,
    },
}

impl PlanSource {
    /// Starts `threads` workers in `scope` over `order` (slots in first-use order, each once);
    /// `slots` is the number of slots.
    pub(crate) fn spawn<'scope, 'env: 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        builder: &PlanBuilder<'env, 'env>,
        order: &[usize],
        slots: usize,
        threads: usize,
    ) -> Self {
        let threads = threads.max(1);
        let window = AHEAD * threads;
        let mut position = vec![usize::MAX; slots];
        for (p, &slot) in order.iter().enumerate() {
            if let Some(cell) = position.get_mut(slot) {
                *cell = p;
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                results: (0..slots).map(|_| None).collect(),
                taken: 0,
                stop: false,
            }),
            stored: Condvar::new(),
            taken: Condvar::new(),
        });
        for w in 0..threads {
            let mine: Vec<(usize, usize)> = order
                .iter()
                .copied()
                .enumerate()
                .skip(w)
                .step_by(threads)
                .collect();
            let b = builder.clone();
            let shared = Arc::clone(&shared);
            scope.spawn(move || {
                for (p, slot) in mine {
                    {
                        let mut state = shared.lock();
                        while !state.stop && p >= state.taken + window {
                            state = shared
                                .taken
                                .wait(state)
                                .unwrap_or_else(PoisonError::into_inner);
                        }
                        if state.stop {
                            return;
                        }
                    }
                    let result = b.build(slot);
                    let mut state = shared.lock();
                    if let Some(cell) = state.results.get_mut(slot) {
                        *cell = Some(result);
                    }
                    drop(state);
                    shared.stored.notify_one();
                }
            });
        }
        PlanSource::Workers {
            shared,
            position,
            window,
        }
    }

    /// The plan of `slot`: the result its worker stored, or built here when no worker will
    /// build it soon (not in the first-use order, or too far ahead).
    pub(crate) fn take(
        &mut self,
        slot: usize,
        builder: &PlanBuilder<'_, '_>,
    ) -> Result<Built, FabricError> {
        let PlanSource::Workers {
            shared,
            position,
            window,
        } = self
        else {
            return builder.build(slot);
        };
        let p = position.get(slot).copied().unwrap_or(usize::MAX);
        let mut state = shared.lock();
        let result = if p < state.taken + *window {
            loop {
                if let Some(result) = state.results.get_mut(slot).and_then(Option::take) {
                    break result;
                }
                state = shared
                    .stored
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        } else {
            drop(state);
            let result = builder.build(slot);
            state = shared.lock();
            result
        };
        state.taken += 1;
        drop(state);
        shared.taken.notify_all();
        result
    }
}

impl Drop for PlanSource {
    /// Stops the workers (the executor has finished or failed).
    fn drop(&mut self) {
        if let PlanSource::Workers { shared, .. } = self {
            shared.lock().stop = true;
            shared.taken.notify_all();
        }
    }
}
