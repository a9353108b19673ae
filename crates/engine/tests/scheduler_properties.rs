//! Property test of the whole decision loop through the public API: random configurations, arrivals
//! (prompt or arrived KV), cancellations and executor outputs (scripted model with EOS and rejected
//! drafts) over many steps. Checked after every step: the budget holds, block tables cover what a
//! step writes, the state's invariants hold (no leak, no double ownership), every streamed token is
//! the model's token at that output index (nothing lost or repeated through preemption). At the end
//! every request has finished exactly once, and the pool is empty.

use std::collections::HashMap;

use pdserve_engine::{
    BLOCK_SIZE_TOKENS, Executor, FinishReason, Request, RequestId, Scheduler, SchedulerConfig,
    ScriptedExecutor, StopConditions, TokenId,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// prompt length, max tokens, KV arrived from a prefill instance.
    Add(usize, usize, bool),
    /// Cancel the n-th added request (modulo the count).
    Cancel(usize),
    /// Plan, execute and apply this many steps.
    Steps(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..300, 1usize..60, any::<bool>()).prop_map(|(p, m, a)| Op::Add(p, m, a)),
        1 => (0usize..1000).prop_map(Op::Cancel),
        4 => (1usize..6).prop_map(Op::Steps),
    ]
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        4usize..16,
        2usize..300,
        1usize..8,
        1usize..200,
        0usize..2,
        any::<bool>(),
    )
        .prop_map(
            |(blocks, budget, running, chunk, spec, tbo)| SchedulerConfig {
                num_kv_blocks: blocks,
                max_batched_tokens: budget,
                max_running_seqs: running,
                prefill_chunk_tokens: chunk,
                max_context_tokens: blocks * BLOCK_SIZE_TOKENS - spec,
                spec_tokens: spec,
                two_batch_overlap: tbo.then(Default::default),
            },
        )
}

const EOS: TokenId = 0;

struct World {
    sched: Scheduler,
    state: pdserve_engine::EngineState<()>,
    exec: ScriptedExecutor,
    now_ns: u64,
    added: Vec<RequestId>,
    /// Streamed tokens per request (an arrived request's first token is also `exec`'s token 0).
    streamed: HashMap<RequestId, Vec<TokenId>>,
    finishes: HashMap<RequestId, Vec<FinishReason>>,
}

impl World {
    fn record(&mut self, update: pdserve_engine::SeqUpdate) {
        if let Some(f) = &update.finish {
            self.finishes.entry(update.id).or_default().push(f.reason);
        }
        if let Some(entry) = self.streamed.get_mut(&update.id) {
            entry.extend(update.tokens);
        }
    }

    fn step(&mut self) -> Result<(), TestCaseError> {
        let config = *self.sched.config();
        let plan = self
            .sched
            .step(self.now_ns, &mut self.state)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(plan.num_batched_tokens <= config.max_batched_tokens);
        let mut seen = Vec::new();
        for c in &plan.prefills {
            prop_assert!(c.block_table.len() * BLOCK_SIZE_TOKENS >= c.start_pos + c.tokens.len());
            seen.push(c.id);
        }
        for d in &plan.decodes {
            prop_assert!(
                d.block_table.len() * BLOCK_SIZE_TOKENS >= d.position + 1 + config.spec_tokens
            );
            seen.push(d.id);
        }
        let n = seen.len();
        seen.sort();
        seen.dedup();
        prop_assert_eq!(seen.len(), n, "a sequence is planned twice");
        prop_assert!(plan.preempted.iter().all(|p| !seen.contains(p)));
        let Ok(out) = self.exec.execute(&plan);
        for update in self
            .state
            .apply(out.seqs)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            self.record(update);
        }
        self.state.check_invariants().map_err(TestCaseError::fail)?;
        self.now_ns += 1_000;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_traffic_never_leaks_and_every_request_finishes(
        config in config(),
        reject_every in 1u64..6,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let sched = Scheduler::new(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut w = World {
            state: sched.new_state(),
            sched,
            exec: ScriptedExecutor::new(40).with_reject_every(reject_every),
            now_ns: 0,
            added: Vec::new(),
            streamed: HashMap::new(),
            finishes: HashMap::new(),
        };
        for op in ops {
            match op {
                Op::Add(prompt_len, max_tokens, arrived) => {
                    let id = RequestId(w.added.len() as u64);
                    let prompt_len = prompt_len.min(config.max_context_tokens - 1);
                    let mut req = Request::new(id, vec![7; prompt_len], ()).with_stop(StopConditions {
                        max_tokens: Some(max_tokens),
                        eos_token_ids: vec![EOS],
                        ..StopConditions::default()
                    });
                    if arrived {
                        req = req.with_kv_arrived(w.exec.token(id, 0));
                    }
                    w.added.push(id);
                    w.streamed.insert(id, Vec::new());
                    if let Some(update) = w.state.add_request(req).map_err(|e| TestCaseError::fail(e.to_string()))? {
                        w.record(update);
                    }
                }
                Op::Cancel(n) => {
                    if !w.added.is_empty() {
                        let id = w.added[n % w.added.len()];
                        if let Ok(update) = w.state.cancel(id) {
                            w.record(update);
                        }
                    }
                }
                Op::Steps(n) => {
                    for _ in 0..n {
                        w.step()?;
                    }
                }
            }
        }
        let mut steps = 0;
        while w.state.has_work() {
            w.step()?;
            steps += 1;
            prop_assert!(steps < 20_000, "no progress");
        }
        prop_assert_eq!(w.state.stats().kv_blocks_used, 0);
        prop_assert_eq!(w.state.stats().num_running + w.state.stats().num_waiting, 0);
        for id in &w.added {
            let finishes = w.finishes.get(id).cloned().unwrap_or_default();
            prop_assert_eq!(finishes.len(), 1, "request {} finished {:?}", id, finishes);
            prop_assert!(finishes[0] != FinishReason::Error);
            let tokens = &w.streamed[id];
            let want: Vec<TokenId> = (0..tokens.len()).map(|k| w.exec.token(*id, k)).collect();
            prop_assert_eq!(tokens, &want, "request {} streamed wrong tokens", id);
            prop_assert!(finishes[0] == FinishReason::Abort || !tokens.is_empty());
        }
    }
}
