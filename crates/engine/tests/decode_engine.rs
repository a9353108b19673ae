//! The model-backed decode engine: scheduler + [`ModelExecutor`] on the tiny golden checkpoint +
//! [`FabricStepClock`] + pacer. Token identity under MTP, TBO, batching and preemption; arrived KV;
//! the fabric's pricing of TBO; traces.

mod common;

use common::{Knobs, Req, add, driver, driver_ep, finish, model, requests, run};
use pdserve_engine::{
    ClockConfig, DraftMode, Executor, ExecutorConfig, FabricStepClock, ModelExecutor, Request,
    RequestId, RoutedRequest, Scheduler, SchedulerConfig, StepPlan, StepRouting, StopConditions,
    WorkWeights,
};
use pdserve_fabric::Schedule;
use pdserve_model::{LayerRouting as ModelLayerRouting, Routing, SamplingParams};

#[test]
fn greedy_output_is_identical_with_mtp_on_and_off() {
    let reqs = requests(6, 0.0, 24);
    let off = run(&Knobs::default(), &reqs);
    let on = run(
        &Knobs {
            mtp: true,
            ..Knobs::default()
        },
        &reqs,
    );
    assert_eq!(on.tokens, off.tokens);
    assert!(on.tokens.values().all(|t| t.len() == 24));
    // Drafts were verified on every decode after the first, some accepted.
    assert!(on.engine.spec_draft_tokens_total > 60, "{:?}", on.engine);
    assert!(on.engine.spec_accepted_tokens_total > 0, "{:?}", on.engine);
    assert_eq!(
        on.engine.spec_accepted_per_pos,
        vec![on.engine.spec_accepted_tokens_total]
    );
    assert_eq!(
        on.exec.drafts_accepted_per_pos,
        vec![on.engine.spec_accepted_tokens_total]
    );
    // Accepted drafts give two tokens in one step: fewer decode slots for the same output.
    let decodes = |r: &common::Run| r.reports.iter().map(|s| s.num_decodes).sum::<usize>();
    assert!(
        decodes(&on) < decodes(&off),
        "{} vs {} decodes; {:?}",
        decodes(&on),
        decodes(&off),
        on.engine
    );
}

#[test]
fn seeded_sampling_gives_the_same_tokens_with_mtp_on_and_off() {
    let reqs = requests(6, 0.8, 20);
    let off = run(&Knobs::default(), &reqs);
    let on = run(
        &Knobs {
            mtp: true,
            ..Knobs::default()
        },
        &reqs,
    );
    assert_eq!(on.tokens, off.tokens);
    assert!(on.engine.spec_draft_tokens_total > 0);
}

#[test]
fn sampled_drafts_with_greedy_parameters_decode_greedily() {
    // DraftMode::Sample verifies with the standard rule; with greedy parameters p and q are point
    // masses, so the output is the greedy output.
    let reqs = requests(4, 0.0, 16);
    let greedy = run(&Knobs::default(), &reqs);
    let sampled = run(
        &Knobs {
            mtp: true,
            draft: DraftMode::Sample,
            ..Knobs::default()
        },
        &reqs,
    );
    assert_eq!(sampled.tokens, greedy.tokens);
    assert!(sampled.engine.spec_draft_tokens_total > 0);
}

#[test]
fn sampled_drafts_run_sampled_requests_to_completion() {
    let reqs = requests(4, 1.0, 16);
    let a = run(
        &Knobs {
            mtp: true,
            draft: DraftMode::Sample,
            ..Knobs::default()
        },
        &reqs,
    );
    assert!(a.tokens.values().all(|t| t.len() == 16));
    assert_eq!(a.engine.kv_blocks_used, 0);
    // Seeds make the standard rule's draws reproducible too.
    let b = run(
        &Knobs {
            mtp: true,
            draft: DraftMode::Sample,
            ..Knobs::default()
        },
        &reqs,
    );
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn tokens_are_identical_with_tbo_on_and_off() {
    let reqs = requests(8, 0.7, 16);
    let base = Knobs {
        mtp: true,
        ..Knobs::default()
    };
    let off = run(&base, &reqs);
    let on = run(
        &Knobs {
            tbo: true,
            ..base.clone()
        },
        &reqs,
    );
    assert_eq!(on.tokens, off.tokens);
    // With TBO each step ran as two forwards (two micro-batches) whenever it had two sequences.
    assert!(on.exec.forwards_total > off.exec.forwards_total);
    let one_forward = run(
        &Knobs {
            tbo: true,
            split_micro_batches: false,
            ..base
        },
        &reqs,
    );
    assert_eq!(one_forward.tokens, off.tokens);
}

#[test]
fn a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch() {
    let reqs = requests(8, 0.9, 12);
    let batch = run(&Knobs::default(), &reqs);
    for r in [&reqs[2], &reqs[5]] {
        let alone = run(&Knobs::default(), std::slice::from_ref(r));
        assert_eq!(alone.tokens[&r.id], batch.tokens[&r.id], "request {}", r.id);
    }
    // The loop finished every request, freed every block, and priced every step.
    assert_eq!(batch.engine.requests_finished_total.length, 8);
    assert_eq!(batch.engine.kv_blocks_used, 0);
    assert!(batch.reports.iter().all(|r| r.idle || r.sim_ns > 0));
}

#[test]
fn preemption_does_not_change_tokens() {
    let reqs = requests(6, 0.8, 40);
    let roomy = run(
        &Knobs {
            mtp: true,
            ..Knobs::default()
        },
        &reqs,
    );
    // 6 blocks of 64 tokens for six sequences of up to 80 tokens: some are preempted and
    // recomputed (their samplers continue, their MTP state restarts).
    let tight = run(
        &Knobs {
            mtp: true,
            num_kv_blocks: 6,
            ..Knobs::default()
        },
        &reqs,
    );
    assert!(tight.engine.preemptions_total > 0, "{:?}", tight.engine);
    assert_eq!(tight.tokens, roomy.tokens);
}

#[test]
fn pacing_waits_for_simulated_time_and_counts_lag_when_the_host_is_slow() {
    // The fake host computes each step in 1 ms; detailed H800 steps take tens of simulated ms.
    let reqs = requests(2, 0.0, 4);
    let paced = run(&Knobs::default(), &reqs);
    for s in paced.reports.iter().filter(|s| !s.idle) {
        assert!(s.sim_ns > s.real_ns);
        assert_eq!((s.pace.lag_ns, s.pace.wait_ns), (0, s.sim_ns - s.real_ns));
    }
    // At time_scale 0.001 the same steps are due after a few tens of µs: every step is late by
    // its real time minus its scaled simulated time, and the lag is summed, not hidden.
    let late = run(
        &Knobs {
            time_scale: 0.001,
            ..Knobs::default()
        },
        &reqs,
    );
    let busy: Vec<_> = late.reports.iter().filter(|s| !s.idle).collect();
    assert!(!busy.is_empty());
    for s in &busy {
        let scaled = (s.sim_ns as f64 * 0.001).round() as u64;
        assert_eq!(s.pace.lag_ns, s.real_ns - scaled);
        assert_eq!(s.pace.wait_ns, 0);
    }
    assert_eq!(
        late.lag_ns_total,
        late.reports.iter().map(|s| s.pace.lag_ns).sum::<u64>()
    );
    assert_eq!(late.tokens, paced.tokens);
}

/// Runs one request's prompt on a "prefill instance" (retaining its KV), exports the KV and the
/// first token, and decodes it on a "decode instance" from the arrived KV.
fn prefill_then_decode(req: &Req, mtp: bool) -> Vec<u32> {
    let knobs = Knobs {
        mtp,
        ..Knobs::default()
    };
    let mut prefill = driver(&knobs);
    let stop = StopConditions {
        max_tokens: Some(1),
        ..StopConditions::default()
    };
    prefill
        .state_mut()
        .add_request(
            Request::new(RequestId(req.id), req.prompt.clone(), req.params.clone())
                .with_stop(stop)
                .with_retained_kv(),
        )
        .expect("admitted");
    let mut first = None;
    let mut t = 0;
    while prefill.state().has_work() {
        let r = prefill.step(t, &mut || t + 1).expect("step");
        t += 10;
        first = first.or(r.updates.iter().find_map(|u| u.tokens.first().copied()));
    }
    let first = first.expect("the prefill sampled a token");
    let table = prefill.state().block_table(RequestId(req.id)).to_vec();
    let kv = prefill
        .executor()
        .export_kv(&table, req.prompt.len())
        .expect("export");

    let mut decode = driver(&knobs);
    decode
        .executor_mut()
        .stage_arrived_kv(RequestId(req.id), kv)
        .expect("staged");
    let stop = StopConditions {
        max_tokens: Some(req.max_tokens),
        ..StopConditions::default()
    };
    decode
        .state_mut()
        .add_request(
            Request::new(RequestId(req.id), req.prompt.clone(), req.params.clone())
                .with_stop(stop)
                .with_kv_arrived(first),
        )
        .expect("admitted");
    let out = finish(decode);
    assert_eq!(out.exec.kv_loads_total, 1);
    let mut tokens = vec![first];
    tokens.extend(&out.tokens[&req.id]);
    tokens
}

#[test]
fn arrived_kv_decodes_exactly_like_a_local_prefill() {
    // Greedy and seeded sampling: the token at output index k uses draw k of the request's seed,
    // so the decode instance continues the prefill instance's stream at index 1.
    for (temperature, mtp) in [(0.0, false), (0.0, true), (0.9, false), (0.9, true)] {
        let reqs = requests(3, temperature, 12);
        let local = run(
            &Knobs {
                mtp,
                ..Knobs::default()
            },
            &reqs,
        );
        for r in &reqs {
            let remote = prefill_then_decode(r, mtp);
            assert_eq!(remote.len(), 12);
            assert_eq!(
                remote, local.tokens[&r.id],
                "request {} temperature {temperature} mtp {mtp}",
                r.id
            );
        }
    }
}

#[test]
fn a_missing_arrived_kv_fails_only_its_request() {
    let mut d = driver(&Knobs::default());
    let reqs = requests(2, 0.0, 4);
    add(&mut d, &reqs[..1]);
    d.state_mut()
        .add_request(
            Request::new(RequestId(77), vec![5, 6, 7], SamplingParams::greedy()).with_kv_arrived(9),
        )
        .expect("admitted");
    let out = finish(d);
    assert_eq!(out.tokens[&0].len(), 4);
    assert!(
        out.tokens.get(&77).is_none_or(Vec::is_empty),
        "no token after the one that arrived, then an error finish"
    );
    assert_eq!(out.engine.requests_finished_total.error, 1);
    assert_eq!(out.exec.failed_seqs_total, 1);
}

#[test]
fn min_tokens_masks_the_suppressed_ids_until_the_index_reaches_it() {
    let free = requests(2, 0.0, 8);
    let natural = run(&Knobs::default(), &free);
    for mtp in [false, true] {
        let knobs = Knobs {
            mtp,
            ..Knobs::default()
        };
        // Suppress what each request would naturally say at indices 0..6, and stop on its
        // natural token at index 1 (which would end it after 2 tokens without the mask).
        let masked: Vec<Req> = free
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.params.min_tokens = 6;
                r.params.suppressed_token_ids = natural.tokens[&r.id][..6].to_vec();
                r
            })
            .collect();
        let mut d = driver(&knobs);
        for r in &masked {
            let stop = StopConditions {
                max_tokens: Some(r.max_tokens),
                min_tokens: 6,
                stop_token_ids: vec![natural.tokens[&r.id][1]],
                ..StopConditions::default()
            };
            d.state_mut()
                .add_request(
                    Request::new(RequestId(r.id), r.prompt.clone(), r.params.clone())
                        .with_stop(stop),
                )
                .expect("admitted");
        }
        let out = finish(d);
        for r in &masked {
            let tokens = &out.tokens[&r.id];
            assert!(tokens.len() >= 6, "mtp {mtp}: {tokens:?}");
            for (k, t) in tokens[..6].iter().enumerate() {
                assert!(
                    !r.params.suppressed_token_ids.contains(t),
                    "mtp {mtp}: index {k} sampled suppressed {t}: {tokens:?}"
                );
            }
            // A prefill instance masks index 0 and a decode instance the rest, identically.
            let remote = prefill_then_decode(
                &Req {
                    max_tokens: tokens.len(),
                    ..r.clone()
                },
                mtp,
            );
            assert_eq!(&remote[..6], &tokens[..6], "mtp {mtp}");
        }
    }
}

/// One emitted token: id, logprob, top alternatives (id, logprob).
type TokenLogprobs = (u32, f32, Vec<(u32, f32)>);

/// Every token's (logprob, top alternatives) of one request, in output order.
fn logprobs_of(mtp: bool, req: &Req) -> Vec<TokenLogprobs> {
    let mut d = driver(&Knobs {
        mtp,
        ..Knobs::default()
    });
    add(&mut d, std::slice::from_ref(req));
    let mut out = Vec::new();
    let mut t = 0;
    while d.state().has_work() {
        let r = d.step(t, &mut || t + 1).expect("step");
        t += 10;
        for u in r.updates {
            assert_eq!(u.logprobs.len(), u.tokens.len());
            assert_eq!(u.top_logprobs.len(), u.tokens.len());
            for ((tok, lp), top) in u.tokens.iter().zip(u.logprobs).zip(u.top_logprobs) {
                out.push((*tok, lp, top));
            }
        }
    }
    out
}

#[test]
fn every_token_carries_its_top_logprobs_with_mtp_on_and_off() {
    let mut req = requests(1, 0.0, 10).remove(0);
    req.params.logprobs = Some(3);
    let off = logprobs_of(false, &req);
    let on = logprobs_of(true, &req);
    assert_eq!(off.len(), 10);
    assert_eq!(on.len(), 10);
    for ((t_off, lp_off, top_off), (t_on, lp_on, top_on)) in off.iter().zip(&on) {
        assert_eq!(t_off, t_on);
        for top in [top_off, top_on] {
            assert_eq!(top.len(), 3);
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
            // Greedy: the chosen token is the most likely one.
            assert_eq!(top[0].0, *t_off);
        }
        assert!((lp_off - lp_on).abs() < 1e-3, "{lp_off} vs {lp_on}");
        assert!((lp_off - top_off[0].1).abs() < 1e-6);
        for (a, b) in top_off.iter().zip(top_on) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1).abs() < 1e-3);
        }
    }
}

/// Real routing of one decode step of the tiny model (16 requests).
fn real_decode_routing() -> StepRouting {
    let (m, e) = model();
    let scheduler = Scheduler::new(SchedulerConfig {
        num_kv_blocks: 32,
        max_context_tokens: 128,
        ..SchedulerConfig::default()
    })
    .expect("scheduler");
    let mut state = scheduler.new_state();
    for r in requests(16, 0.0, 8) {
        state
            .add_request(Request::new(RequestId(r.id), r.prompt, r.params.clone()))
            .expect("admitted");
    }
    let mut exec = ModelExecutor::new(m, e, ExecutorConfig::for_scheduler(scheduler.config(), 16))
        .expect("executor");
    loop {
        let plan = scheduler.step(0, &mut state).expect("plan");
        let out = exec.execute(&plan).expect("step");
        if plan.prefills.is_empty() {
            return out.routing;
        }
        state.apply(out.seqs).expect("apply");
    }
}

/// `ranks × per_rank` one-token decodes at `context` tokens whose expert choices cycle through the
/// rows of `real` (the tiny model's routing), micro-batches alternating within each rank.
fn replicate(real: &StepRouting, ranks: u32, per_rank: usize, context: usize) -> StepRouting {
    let n = ranks as usize * per_rank;
    let layers = real
        .layers
        .iter()
        .map(|l| {
            let k = l.routing.top_k;
            let rows = l.routing.tokens();
            let ids = (0..n)
                .flat_map(|t| l.routing.ids[(t % rows) * k..(t % rows + 1) * k].to_vec())
                .collect();
            ModelLayerRouting {
                layer: l.layer,
                routing: Routing {
                    top_k: k,
                    ids,
                    weights: vec![1.0; n * k],
                },
            }
        })
        .collect();
    StepRouting {
        requests: (0..n)
            .map(|t| RoutedRequest {
                id: RequestId(t as u64),
                rank: (t / per_rank) as u32,
                micro_batch: (t % 2) as u8,
                cached_tokens: context,
                rows: t..t + 1,
                mtp_rows: 0..0,
            })
            .collect(),
        num_rows: n,
        num_mtp_rows: 0,
        layers,
        mtp: None,
        placements: None,
        served_gpus: None,
    }
}

fn plan_with(tbo: bool) -> StepPlan<()> {
    // The clock reads the plan's schedule (micro-batches or not) and speculation; the batch itself
    // comes from the routing.
    let scheduler = Scheduler::new(SchedulerConfig {
        two_batch_overlap: tbo.then(WorkWeights::default),
        ..SchedulerConfig::default()
    })
    .expect("scheduler");
    let mut state = scheduler.new_state::<()>();
    state
        .add_request(Request::new(RequestId(0), vec![1], ()))
        .expect("admitted");
    scheduler.step(0, &mut state).expect("plan")
}

#[test]
fn tbo_shortens_the_simulated_step_on_a_communication_heavy_configuration() {
    // DeepSeek's production decode unit: EP144 on 18 H800 nodes, 32 redundant experts (2 routed +
    // 1 shared expert per GPU), 64 decodes per GPU at a 4K context. Few weights per GPU and many
    // tokens crossing InfiniBand make communication matter; the expert choices are the tiny
    // model's real routing, replicated over the 9,216 tokens.
    let real = real_decode_routing();
    assert!(!real.layers.is_empty());
    let routing = replicate(&real, 144, 64, 4096);
    let mut clock = FabricStepClock::new(ClockConfig {
        ep_size: 144,
        redundant_experts: 32,
        ..ClockConfig::default()
    })
    .expect("clock");
    let tbo = clock.simulate(&plan_with(true), &routing).expect("tbo");
    let single = clock.simulate(&plan_with(false), &routing).expect("single");
    assert_eq!(
        (tbo.schedule, single.schedule),
        (Schedule::TwoBatchOverlap, Schedule::SingleBatch)
    );
    assert_eq!(tbo.outcome.tokens, 144 * 64);
    assert!(
        tbo.duration_ns < single.duration_ns * 95 / 100,
        "TBO {} ns vs single batch {} ns",
        tbo.duration_ns,
        single.duration_ns
    );
    // Deterministic.
    let again = clock.simulate(&plan_with(true), &routing).expect("tbo");
    assert_eq!(again.duration_ns, tbo.duration_ns);
}

#[test]
fn a_step_dumps_as_a_perfetto_trace() {
    let mut d = driver(&Knobs {
        tbo: true,
        ..Knobs::default()
    });
    // Two requests per DP rank, so that every GPU has two micro-batches once all are decoding.
    add(&mut d, &requests(32, 0.0, 3));
    let mut t = 0;
    let mut names = std::collections::BTreeSet::new();
    let mut traced = 0;
    while d.state().has_work() {
        d.clock_mut().record_next_step();
        let r = d.step(t, &mut || t + 1).expect("step");
        t = r.pace.release_ns;
        if let Some(trace) = d.clock_mut().take_trace() {
            let json = trace.to_chrome_json();
            let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            let events = v["traceEvents"].as_array().expect("traceEvents");
            names.extend(
                events
                    .iter()
                    .filter_map(|e| e["name"].as_str().map(String::from)),
            );
            traced += 1;
        }
    }
    assert!(traced >= 3);
    for name in [
        "ATTN-0(0)",
        "ATTN-0(1)",
        "MLP(1)",
        "DISPATCH(0)",
        "COMBINE(1)",
    ] {
        assert!(names.contains(name), "no {name} in {names:?}");
    }
}

#[test]
fn the_ep_runtime_gives_the_local_experts_tokens_and_prices_its_placement() {
    // EP16 with 16 redundant slots, EPLB every 3 steps: real hidden rows cross the EP transport,
    // experts move between ranks mid-run; greedy tokens stay those of local experts (the EP
    // runtime equals LocalExperts within float reassociation).
    let knobs = Knobs {
        tbo: true,
        mtp: true,
        ..Knobs::default()
    };
    let reqs = requests(8, 0.0, 12);
    let local = run(&knobs, &reqs);
    let mut d = driver_ep(&knobs, 3);
    add(&mut d, &reqs);
    let ep = finish(d);
    assert_eq!(ep.tokens, local.tokens);
    assert!(ep.reports.iter().all(|r| r.idle || r.sim_ns > 0));
}

#[test]
fn the_clock_prices_the_placement_the_step_ran_with() {
    // A hot placement: the step's 16 most loaded experts (by its real routing) all on GPU 0, the
    // next 16 on GPU 1, … GPU 0 then receives far more copies than under the contiguous layout.
    let real = real_decode_routing();
    let mut clock = FabricStepClock::new(ClockConfig {
        ep_size: 16,
        ..ClockConfig::default()
    })
    .expect("clock");
    let spread = clock.simulate(&plan_with(false), &real).expect("spread");
    let mut load = vec![0usize; 256];
    for counts in real.expert_counts(256) {
        for (e, c) in counts.into_iter().enumerate() {
            load[e] += c;
        }
    }
    let mut by_load: Vec<usize> = (0..256).collect();
    by_load.sort_by_key(|&e| (std::cmp::Reverse(load[e]), e));
    let mut replicas = vec![Vec::new(); 256];
    for (i, &e) in by_load.iter().enumerate() {
        replicas[e].push((i / 16) as u32);
    }
    let hot = pdserve_fabric::ExpertPlacement::new(16, replicas).expect("placement");
    let mut pinned = real.clone();
    pinned.placements = Some(vec![hot; real.layers.len() + 1]);
    let pinned = clock.simulate(&plan_with(false), &pinned).expect("pinned");
    assert!(
        pinned.duration_ns > spread.duration_ns,
        "{} vs {}",
        pinned.duration_ns,
        spread.duration_ns
    );
}

#[test]
fn the_clock_states_how_real_routing_is_reused() {
    let clock = FabricStepClock::new(ClockConfig {
        ep_size: 16,
        ..ClockConfig::default()
    })
    .expect("clock");
    let note = clock.routing_note(2);
    assert!(
        note.contains("58 modeled MoE layers") && note.contains("2 MoE layers"),
        "{note}"
    );
    assert!(
        clock.check_real_model(512).is_err(),
        "more real experts than modeled"
    );
}
