//! Behaviour tests of the scheduler and the engine state, driven by the scripted executor.

use super::*;
use crate::executor::{Executor, ScriptedExecutor, SeqOutput};
use crate::microbatch::WorkWeights;
use crate::sequence::{Request, TokenId};
use crate::state::{AdmitError, LookupError, SeqUpdate};
use crate::stop::tests::VocabDetokenizer;
use crate::stop::{FinishReason, StopConditions, StopConfigError, StopMatch};

fn config(num_kv_blocks: usize, max_batched_tokens: usize, spec_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        num_kv_blocks,
        max_batched_tokens,
        max_running_seqs: 64,
        prefill_chunk_tokens: 512,
        max_context_tokens: (num_kv_blocks * 64 - spec_tokens).min(4096),
        spec_tokens,
        two_batch_overlap: None,
    }
}

fn max_tokens(n: usize) -> StopConditions {
    StopConditions {
        max_tokens: Some(n),
        ..StopConditions::default()
    }
}

/// Drives scheduler + state + scripted executor; records every plan and update.
struct Harness {
    sched: Scheduler,
    state: EngineState<u32>,
    exec: ScriptedExecutor,
    now_ns: u64,
    plans: Vec<StepPlan<u32>>,
    updates: Vec<SeqUpdate>,
}

impl Harness {
    fn new(config: SchedulerConfig) -> Self {
        let sched = Scheduler::new(config).unwrap();
        Self {
            state: sched.new_state(),
            sched,
            exec: ScriptedExecutor::new(1000),
            now_ns: 0,
            plans: Vec::new(),
            updates: Vec::new(),
        }
    }

    fn prompt(id: u64, len: usize) -> Vec<TokenId> {
        (0..len)
            .map(|i| (id as u32 * 31 + i as u32) % 1000)
            .collect()
    }

    fn add(&mut self, id: u64, prompt_len: usize, stop: StopConditions) {
        let req = Request::new(RequestId(id), Self::prompt(id, prompt_len), id as u32)
            .with_stop(stop)
            .arrived_at(self.now_ns);
        self.add_request(req);
    }

    fn add_request(&mut self, req: Request<u32>) {
        if let Some(update) = self.state.add_request(req).unwrap() {
            self.updates.push(update);
        }
    }

    fn step(&mut self) -> StepPlan<u32> {
        let plan = self.sched.step(self.now_ns, &mut self.state).unwrap();
        assert!(plan.num_batched_tokens <= self.sched.config().max_batched_tokens);
        let Ok(out) = self.exec.execute(&plan);
        let updates = self.state.apply(out.seqs).unwrap();
        self.state.check_invariants().unwrap();
        self.updates.extend(updates);
        self.plans.push(plan.clone());
        self.now_ns += 1_000;
        plan
    }

    fn run_until_idle(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.state.has_work() {
                return;
            }
            self.step();
        }
        panic!("still busy after {max_steps} steps");
    }

    fn output(&self, id: u64) -> Vec<TokenId> {
        self.updates
            .iter()
            .filter(|u| u.id == RequestId(id))
            .flat_map(|u| u.tokens.iter().copied())
            .collect()
    }

    fn finish(&self, id: u64) -> Option<&crate::stop::Finish> {
        self.updates
            .iter()
            .filter(|u| u.id == RequestId(id))
            .find_map(|u| u.finish.as_ref())
    }

    fn expected(&self, id: u64, n: usize) -> Vec<TokenId> {
        (0..n).map(|k| self.exec.token(RequestId(id), k)).collect()
    }
}

#[test]
fn step_budget_is_never_exceeded_and_counts_every_planned_token() {
    let mut h = Harness::new(SchedulerConfig {
        prefill_chunk_tokens: 64,
        ..config(64, 100, 0)
    });
    for id in 0..10 {
        h.add(id, 150, max_tokens(20));
    }
    h.run_until_idle(500);
    for plan in &h.plans {
        let prefill: usize = plan.prefills.iter().map(|c| c.tokens.len()).sum();
        assert_eq!(plan.num_batched_tokens, prefill + plan.decodes.len());
        assert!(plan.num_batched_tokens <= 100);
    }
    assert!(
        h.plans.iter().any(|p| p.num_batched_tokens == 100),
        "budget is used"
    );
    for id in 0..10 {
        assert_eq!(h.output(id), h.expected(id, 20));
        assert_eq!(h.finish(id).unwrap().reason, FinishReason::Length);
    }
}

#[test]
fn waiting_requests_are_admitted_in_fcfs_order() {
    let mut h = Harness::new(SchedulerConfig {
        max_running_seqs: 2,
        ..config(64, 512, 0)
    });
    for id in [5, 3, 9, 1] {
        h.add(id, 10, max_tokens(3));
    }
    h.run_until_idle(100);
    let mut first_seen = Vec::new();
    for plan in &h.plans {
        for id in plan.prefills.iter().map(|c| c.id.0) {
            if !first_seen.contains(&id) {
                first_seen.push(id);
            }
        }
        assert!(plan.num_sequences() <= 2);
    }
    assert_eq!(first_seen, vec![5, 3, 9, 1]);
}

#[test]
fn full_pool_preempts_the_newest_and_every_request_still_completes() {
    // 4 blocks; 4 requests of 60 prompt tokens growing to 160 each: the pool holds one at a time.
    let mut h = Harness::new(config(4, 512, 0));
    for id in 0..4 {
        h.add(id, 60, max_tokens(100));
    }
    h.run_until_idle(2_000);
    let first_preemption = h.plans.iter().find(|p| !p.preempted.is_empty()).unwrap();
    assert_eq!(
        first_preemption.preempted[0],
        RequestId(3),
        "newest goes first"
    );
    assert!(h.state.stats().preemptions_total >= 3);
    for id in 0..4 {
        assert_eq!(
            h.output(id),
            h.expected(id, 100),
            "request {id} lost nothing"
        );
        assert_eq!(h.finish(id).unwrap().reason, FinishReason::Length);
    }
    assert_eq!(h.state.stats().kv_blocks_used, 0);
    assert_eq!(h.state.stats().requests_finished_total.length, 4);
}

#[test]
fn preempted_request_is_requeued_ahead_of_later_arrivals() {
    let mut h = Harness::new(config(2, 512, 0));
    h.add(0, 60, max_tokens(60));
    h.add(1, 60, max_tokens(60));
    // Request 0 outgrows its block at 64 tokens and evicts request 1.
    while h.state.stats().preemptions_total == 0 {
        h.step();
    }
    h.add(2, 10, max_tokens(5));
    let waiting: Vec<_> = h.state.waiting().collect();
    assert_eq!(waiting, vec![RequestId(1), RequestId(2)]);
    h.run_until_idle(1_000);
    let done: Vec<_> = h
        .updates
        .iter()
        .filter(|u| u.finish.is_some())
        .map(|u| u.id.0)
        .collect();
    assert_eq!(done, vec![0, 1, 2]);
}

#[test]
fn cancel_frees_blocks_at_once_for_running_and_waiting_requests() {
    let mut h = Harness::new(SchedulerConfig {
        max_running_seqs: 1,
        ..config(8, 512, 0)
    });
    h.add(1, 100, max_tokens(50));
    h.add(2, 10, max_tokens(50));
    h.step();
    assert_eq!(h.state.stats().kv_blocks_used, 2);
    let update = h.state.cancel(RequestId(1)).unwrap();
    assert_eq!(update.finish.unwrap().reason, FinishReason::Abort);
    assert_eq!(
        h.state.stats().kv_blocks_used,
        0,
        "freed before any further step"
    );
    let update = h.state.cancel(RequestId(2)).unwrap();
    assert_eq!(update.num_output_tokens, 0);
    assert!(!h.state.has_work());
    assert_eq!(
        h.state.cancel(RequestId(2)),
        Err(LookupError::Unknown(RequestId(2)))
    );
    let plan = h.step();
    assert_eq!(
        plan.finished,
        vec![
            (RequestId(1), FinishReason::Abort),
            (RequestId(2), FinishReason::Abort)
        ]
    );
    assert_eq!(h.state.stats().requests_finished_total.abort, 2);
}

#[test]
fn cancel_during_a_step_drops_that_sequences_outputs() {
    let mut h = Harness::new(config(8, 512, 0));
    h.add(1, 10, max_tokens(50));
    h.add(2, 10, max_tokens(50));
    let plan = h.sched.step(0, &mut h.state).unwrap();
    let Ok(out) = h.exec.execute(&plan);
    h.state.cancel(RequestId(1)).unwrap();
    let updates = h.state.apply(out.seqs).unwrap();
    assert_eq!(
        updates.iter().map(|u| u.id).collect::<Vec<_>>(),
        vec![RequestId(2)]
    );
    assert_eq!(h.state.stats().ignored_outputs_total, 1);
    h.state.check_invariants().unwrap();
}

#[test]
fn long_prompt_is_prefilled_in_chunks_across_steps() {
    let mut h = Harness::new(SchedulerConfig {
        prefill_chunk_tokens: 64,
        ..config(8, 512, 0)
    });
    h.add(1, 200, max_tokens(2));
    let ranges: Vec<_> = (0..4)
        .map(|_| {
            let plan = h.step();
            assert!(plan.decodes.is_empty());
            let c = &plan.prefills[0];
            assert_eq!(
                c.tokens,
                Harness::prompt(1, 200)[c.start_pos..c.start_pos + c.tokens.len()]
            );
            (c.start_pos, c.start_pos + c.tokens.len(), c.samples)
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (0, 64, false),
            (64, 128, false),
            (128, 192, false),
            (192, 200, true)
        ]
    );
    assert_eq!(h.output(1), h.expected(1, 1), "only the last chunk samples");
    let plan = h.step();
    assert_eq!(plan.decodes[0].position, 200);
    assert_eq!(
        plan.decodes[0].params, 1,
        "sampling parameters reach the executor"
    );
}

#[test]
fn prefill_chunk_takes_the_budget_that_decodes_leave() {
    let mut h = Harness::new(config(8, 10, 0));
    h.add(1, 5, max_tokens(20));
    h.step();
    h.add(2, 30, max_tokens(20));
    let plan = h.step();
    assert_eq!(plan.decodes.len(), 1);
    assert_eq!(plan.prefills[0].tokens.len(), 9);
    assert_eq!(plan.num_batched_tokens, 10);
}

#[test]
fn kv_arrived_request_goes_straight_to_decode() {
    let mut h = Harness::new(config(8, 512, 0));
    let prompt = Harness::prompt(7, 100);
    h.add_request(
        Request::new(RequestId(7), prompt, 7)
            .with_kv_arrived(42)
            .with_stop(max_tokens(4)),
    );
    assert_eq!(
        h.output(7),
        vec![42],
        "the first token is streamed at admission"
    );
    let plan = h.step();
    assert!(plan.prefills.is_empty());
    assert_eq!(plan.kv_loads.len(), 1);
    assert_eq!(plan.kv_loads[0].num_tokens, 100);
    assert_eq!(plan.kv_loads[0].block_table.len(), 2);
    let d = &plan.decodes[0];
    assert_eq!(
        (d.input_token, d.position, d.num_output_tokens),
        (42, 100, 1)
    );
    h.run_until_idle(10);
    let mut want = vec![42];
    want.extend((1..4).map(|k| h.exec.token(RequestId(7), k)));
    assert_eq!(h.output(7), want);
    assert!(
        h.plans[1..].iter().all(|p| p.kv_loads.is_empty()),
        "KV is loaded once"
    );
}

#[test]
fn a_prefill_draft_travels_with_retained_kv_and_is_verified_in_the_first_decode_step() {
    // Prefill side: the last chunk samples the first token and drafts the next; the draft stays
    // with the retained KV.
    let mut p = Harness::new(config(8, 512, 1));
    p.add_request(
        Request::new(RequestId(3), Harness::prompt(3, 40), 3)
            .with_stop(max_tokens(1))
            .with_retained_kv(),
    );
    p.step();
    let first = p.output(3)[0];
    let draft = p.state.sequence(RequestId(3)).and_then(|s| s.draft());
    assert_eq!(draft, Some(p.exec.draft(RequestId(3), 1)));
    // Decode side, speculative decoding on: the first decode verifies it (accepted: two tokens).
    let arrive = |spec_tokens| {
        let mut d = Harness::new(config(8, 512, spec_tokens));
        d.add_request(
            Request::new(RequestId(3), Harness::prompt(3, 40), 3)
                .with_kv_arrived(first)
                .with_kv_draft(draft)
                .with_stop(max_tokens(6)),
        );
        let plan = d.step();
        (plan.decodes[0].draft_token, d)
    };
    let (verified, mut d) = arrive(1);
    assert_eq!(verified, draft);
    assert_eq!(d.output(3).len(), 3, "first token, then two from one step");
    assert_eq!(d.state.stats().spec_drafts_total, 1);
    d.run_until_idle(20);
    assert_eq!(d.output(3), d.expected(3, 6));
    // Without speculative decoding the draft is ignored.
    let (ignored, _) = arrive(0);
    assert_eq!(ignored, None);
}

#[test]
fn kv_arrived_request_waits_for_blocks_then_is_admitted() {
    let mut h = Harness::new(config(3, 512, 0));
    h.add(1, 120, max_tokens(8)); // 2 blocks, up to 128 tokens
    h.step();
    h.add_request(
        Request::new(RequestId(2), Harness::prompt(2, 100), 2)
            .with_kv_arrived(5)
            .with_stop(max_tokens(5)),
    );
    // Needs 2 blocks for 101 tokens; 1 is free.
    let plan = h.step();
    assert!(plan.decodes.iter().all(|d| d.id != RequestId(2)));
    assert_eq!(
        h.state.sequence(RequestId(2)).unwrap().state(),
        SequenceState::Waiting
    );
    h.run_until_idle(100);
    assert_eq!(h.finish(1).unwrap().reason, FinishReason::Length);
    assert!(
        h.plans
            .iter()
            .any(|p| p.kv_loads.iter().any(|k| k.id == RequestId(2)))
    );
}

#[test]
fn preempted_kv_arrived_request_is_recomputed_from_its_tokens() {
    let mut h = Harness::new(config(3, 512, 0));
    h.add(1, 100, max_tokens(80));
    h.step();
    h.add_request(
        Request::new(RequestId(2), Harness::prompt(2, 60), 2)
            .with_kv_arrived(7)
            .with_stop(max_tokens(50)),
    );
    h.run_until_idle(500);
    let plan = h
        .plans
        .iter()
        .find(|p| p.prefills.iter().any(|c| c.id == RequestId(2)))
        .expect("request 2 was recomputed");
    let chunk = plan.prefills.iter().find(|c| c.id == RequestId(2)).unwrap();
    let before = &h.output(2)[..chunk.num_output_tokens];
    let mut tokens = Harness::prompt(2, 60);
    tokens.extend_from_slice(before);
    assert_eq!(chunk.tokens, tokens, "prompt plus the output so far");
    let mut want = vec![7];
    want.extend((1..50).map(|k| h.exec.token(RequestId(2), k)));
    assert_eq!(h.output(2), want, "nothing lost or streamed twice");
}

#[test]
fn eos_finishes_the_request_and_frees_its_blocks() {
    let mut h = Harness::new(config(8, 512, 0));
    h.exec = h.exec.clone().with_script(RequestId(1), vec![5, 6, 2, 9]);
    h.add(
        1,
        10,
        StopConditions {
            eos_token_ids: vec![2],
            ..max_tokens(10)
        },
    );
    h.run_until_idle(10);
    assert_eq!(h.output(1), vec![5, 6, 2]);
    assert_eq!(h.finish(1).unwrap().matched, Some(StopMatch::Eos(2)));
    assert_eq!(h.state.stats().kv_blocks_used, 0);
}

#[test]
fn ignore_eos_runs_to_max_tokens() {
    let mut h = Harness::new(config(8, 512, 0));
    h.exec = h.exec.clone().with_script(RequestId(1), vec![2, 2, 2, 2]);
    h.add(
        1,
        10,
        StopConditions {
            eos_token_ids: vec![2],
            ignore_eos: true,
            ..max_tokens(4)
        },
    );
    h.run_until_idle(10);
    assert_eq!(h.output(1), vec![2, 2, 2, 2]);
    assert_eq!(h.finish(1).unwrap().reason, FinishReason::Length);
}

#[test]
fn min_tokens_defers_eos_and_stop_token_ids() {
    let mut h = Harness::new(config(8, 512, 0));
    h.exec = h
        .exec
        .clone()
        .with_script(RequestId(1), vec![2, 3, 2, 3, 4]);
    h.add(
        1,
        10,
        StopConditions {
            eos_token_ids: vec![2],
            stop_token_ids: vec![3],
            min_tokens: 4,
            ..max_tokens(10)
        },
    );
    h.run_until_idle(10);
    assert_eq!(h.output(1), vec![2, 3, 2, 3]);
    assert_eq!(h.finish(1).unwrap().matched, Some(StopMatch::StopToken(3)));
}

#[test]
fn stop_string_ends_the_request_and_is_cut_from_the_streamed_text() {
    let mut h = Harness::new(config(8, 512, 0));
    // Vocabulary: 0 "Hello", 1 " wor", 2 "ld", 3 "!", 4 " END", 5 "EN", 6 "D".
    h.exec = h
        .exec
        .clone()
        .with_script(RequestId(1), vec![0, 1, 2, 5, 6, 3, 3]);
    let detok = VocabDetokenizer(vec!["Hello", " wor", "ld", "!", " END", "EN", "D"]);
    h.add_request(
        Request::new(RequestId(1), vec![9, 9], 1)
            .with_stop(StopConditions {
                stop_strings: vec!["END".into()],
                ..max_tokens(10)
            })
            .with_detokenizer(Box::new(detok)),
    );
    h.run_until_idle(10);
    let text: String = h.updates.iter().filter_map(|u| u.text.clone()).collect();
    assert_eq!(text, "Hello world");
    assert_eq!(h.output(1), vec![0, 1, 2, 5, 6]);
    assert_eq!(
        h.finish(1).unwrap().matched,
        Some(StopMatch::StopString("END".into()))
    );
}

#[test]
fn context_limit_finishes_with_length() {
    let mut h = Harness::new(SchedulerConfig {
        max_context_tokens: 70,
        ..config(8, 512, 0)
    });
    h.add(1, 60, StopConditions::default());
    h.run_until_idle(20);
    assert_eq!(h.output(1).len(), 10);
    assert_eq!(h.finish(1).unwrap().reason, FinishReason::Length);
}

#[test]
fn spec_tokens_reserve_a_draft_slot_in_blocks() {
    // Prompt 63 + first token = 64 tokens: one block would hold them, but not the draft slot.
    let mut h = Harness::new(config(8, 512, 1));
    h.add(1, 63, max_tokens(10));
    h.step();
    let plan = h.step();
    let d = &plan.decodes[0];
    assert_eq!((d.position, d.block_table.len()), (63, 2));
    assert_eq!(plan.num_batched_tokens, 2);
    let mut plain = Harness::new(config(8, 512, 0));
    plain.add(1, 63, max_tokens(10));
    plain.step();
    assert_eq!(plain.step().decodes[0].block_table.len(), 1);
}

#[test]
fn spec_tokens_reserve_a_draft_slot_in_the_budget() {
    // Budget 3: a decode costs 2 with spec_tokens 1, so only one decode fits per step.
    let mut h = Harness::new(config(8, 3, 1));
    h.add(1, 1, max_tokens(6));
    h.add(2, 1, max_tokens(6));
    h.run_until_idle(100);
    for plan in &h.plans {
        let prefill: usize = plan.prefills.iter().map(|c| c.tokens.len()).sum();
        assert!(plan.decodes.len() <= 1);
        assert_eq!(plan.num_batched_tokens, prefill + 2 * plan.decodes.len());
    }
    assert_eq!(h.output(2), h.expected(2, 6));
}

#[test]
fn spec_decoding_gives_the_same_output_in_fewer_steps_and_counts_acceptance() {
    let run = |spec_tokens| {
        let mut h = Harness::new(config(64, 512, spec_tokens));
        h.exec = h.exec.clone().with_reject_every(4);
        for id in 0..6 {
            h.add(id, 20 + id as usize, max_tokens(40));
        }
        h.run_until_idle(500);
        h
    };
    let plain = run(0);
    let spec = run(1);
    for id in 0..6 {
        assert_eq!(spec.output(id), plain.output(id));
        assert_eq!(spec.output(id).len(), 40);
    }
    assert!(spec.plans.len() < plain.plans.len());
    let s = spec.state.stats();
    assert!(s.spec_drafts_total > 0);
    assert!(
        s.spec_accepted_tokens_total > 0
            && s.spec_accepted_tokens_total < s.spec_draft_tokens_total
    );
    assert_eq!(s.spec_accepted_per_pos, vec![s.spec_accepted_tokens_total]);
    assert_eq!(plain.state.stats().spec_drafts_total, 0);
}

#[test]
fn requests_that_can_never_fit_are_rejected_not_queued() {
    let mut h = Harness::new(SchedulerConfig {
        max_context_tokens: 100,
        ..config(8, 512, 0)
    });
    let too_long = Request::new(RequestId(1), Harness::prompt(1, 100), 0);
    assert!(matches!(
        h.state.add_request(too_long),
        Err(AdmitError::PromptTooLong {
            prompt_tokens: 100,
            max_context_tokens: 100,
            ..
        })
    ));
    let err = h
        .state
        .add_request(Request::new(RequestId(1), vec![], 0))
        .unwrap_err();
    assert_eq!(err, AdmitError::EmptyPrompt(RequestId(1)));
    let no_detok = Request::new(RequestId(2), vec![1], 0).with_stop(StopConditions {
        stop_strings: vec!["x".into()],
        ..StopConditions::default()
    });
    assert!(matches!(
        h.state.add_request(no_detok),
        Err(AdmitError::Stop {
            source: StopConfigError::StopStringsWithoutDetokenizer,
            ..
        })
    ));
    h.add(3, 99, max_tokens(1));
    let dup = Request::new(RequestId(3), vec![1], 0);
    assert_eq!(
        h.state.add_request(dup).unwrap_err(),
        AdmitError::DuplicateId(RequestId(3))
    );
    assert_eq!(h.state.stats().requests_rejected_total, 4);
    assert!(err.to_string().contains("`prompt`"));
}

#[test]
fn planning_twice_without_apply_is_refused() {
    let mut h = Harness::new(config(8, 512, 0));
    h.add(1, 5, max_tokens(3));
    let plan = h.sched.step(0, &mut h.state).unwrap();
    assert_eq!(
        h.sched.step(1, &mut h.state),
        Err(StepError::StepInFlight {
            step_id: plan.step_id
        })
    );
    h.state.apply(vec![]).unwrap();
    assert_eq!(h.state.apply(vec![]), Err(StepError::NoStepInFlight));
    let other = Scheduler::new(config(16, 512, 0)).unwrap();
    assert_eq!(other.step(2, &mut h.state), Err(StepError::ConfigMismatch));
}

#[test]
fn malformed_executor_output_fails_only_that_sequence() {
    let mut h = Harness::new(config(8, 512, 0));
    for id in 1..=4 {
        h.add(id, 5, max_tokens(5));
    }
    let plan = h.sched.step(0, &mut h.state).unwrap();
    assert_eq!(plan.prefills.len(), 4);
    let ok = |id, tokens: Vec<TokenId>| SeqOutput {
        id: RequestId(id),
        tokens,
        ..SeqOutput::default()
    };
    let outputs = vec![
        ok(1, vec![10]),
        ok(2, vec![10, 11]),
        ok(3, vec![10]),
        ok(3, vec![10]),
        SeqOutput {
            draft: Some(3),
            ..ok(99, vec![1])
        },
    ];
    let updates = h.state.apply(outputs).unwrap();
    let reason = |id| {
        updates
            .iter()
            .find(|u| u.id == RequestId(id))
            .and_then(|u| u.finish.as_ref().map(|f| f.reason))
    };
    assert_eq!(reason(1), None);
    assert_eq!(
        reason(2),
        Some(FinishReason::Error),
        "two tokens from a prefill"
    );
    assert_eq!(reason(3), Some(FinishReason::Error), "duplicate output");
    assert_eq!(reason(4), Some(FinishReason::Error), "missing output");
    assert_eq!(h.state.stats().ignored_outputs_total, 1);
    assert_eq!(h.state.running(), &[RequestId(1)]);
    h.state.check_invariants().unwrap();
}

#[test]
fn failed_step_finishes_its_sequences_with_error_and_frees_blocks() {
    let mut h = Harness::new(config(8, 512, 0));
    h.add(1, 5, max_tokens(5));
    h.sched.step(0, &mut h.state).unwrap();
    let updates = h.state.fail_step("device lost").unwrap();
    let finish = updates[0].finish.as_ref().unwrap();
    assert_eq!(finish.reason, FinishReason::Error);
    assert!(finish.message.as_deref().unwrap().contains("device lost"));
    assert_eq!(h.state.stats().kv_blocks_used, 0);
    assert!(!h.state.has_work());
}

#[test]
fn retained_kv_is_kept_after_finish_until_released() {
    let mut h = Harness::new(config(8, 512, 0));
    h.add_request(
        Request::new(RequestId(1), Harness::prompt(1, 100), 1)
            .with_stop(max_tokens(1))
            .with_retained_kv(),
    );
    assert_eq!(
        h.state.release_kv(RequestId(1)),
        Err(LookupError::NotFinished(RequestId(1)))
    );
    h.step();
    assert_eq!(h.finish(1).unwrap().reason, FinishReason::Length);
    assert!(!h.state.has_work());
    assert_eq!(h.state.block_table(RequestId(1)).len(), 2);
    assert_eq!(h.state.stats().num_retained, 1);
    assert_eq!(h.state.release_kv(RequestId(1)), Ok(2));
    assert_eq!(h.state.stats().kv_blocks_used, 0);
    assert_eq!(
        h.state.release_kv(RequestId(1)),
        Err(LookupError::Unknown(RequestId(1)))
    );
}

#[test]
fn two_batch_overlap_splits_the_batch_into_balanced_micro_batches() {
    let mut h = Harness::new(SchedulerConfig {
        two_batch_overlap: Some(WorkWeights {
            attention_per_pair: 1,
            per_token: 100,
        }),
        prefill_chunk_tokens: 1024,
        ..config(64, 4096, 0)
    });
    for (id, len) in [(1, 1000), (2, 40), (3, 900), (4, 60), (5, 500)] {
        h.add(id, len, max_tokens(5));
    }
    h.step();
    let plan = h.step();
    assert_eq!(plan.decodes.len(), 5);
    let work = plan.micro_batch_work.unwrap();
    let mut sums = [0u64; 2];
    for d in &plan.decodes {
        sums[d.micro_batch as usize] += d.position as u64 + 1 + 100;
    }
    assert_eq!(sums, work);
    assert!(work[0].abs_diff(work[1]) <= 1001 + 100);
    assert!(plan.decodes.iter().any(|d| d.micro_batch == 1));
    assert_eq!(
        Harness::new(config(8, 512, 0)).step().micro_batch_work,
        None
    );
}

#[test]
fn queue_time_is_reported_once_from_arrival_to_first_schedule() {
    let mut h = Harness::new(config(8, 512, 0));
    h.now_ns = 5_000;
    h.add_request(
        Request::new(RequestId(1), vec![1, 2], 1)
            .with_stop(max_tokens(3))
            .arrived_at(1_000),
    );
    h.run_until_idle(10);
    let times: Vec<_> = h.updates.iter().map(|u| u.queue_time_ns).collect();
    assert_eq!(times, vec![Some(4_000), None, None]);
}

#[test]
fn finished_requests_are_listed_in_the_next_plan() {
    let mut h = Harness::new(config(8, 512, 0));
    h.add(1, 5, max_tokens(1));
    h.add(2, 5, max_tokens(3));
    h.step();
    let plan = h.step();
    assert_eq!(plan.finished, vec![(RequestId(1), FinishReason::Length)]);
    assert!(plan.decodes.iter().all(|d| d.id != RequestId(1)));
}

#[test]
fn engine_state_can_move_into_an_actor_task() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<EngineState<u32>>();
    assert_send::<StepPlan<u32>>();
}
