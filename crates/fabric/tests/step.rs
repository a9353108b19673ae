//! Step simulation behaviours and bad input.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions fail loudly on bad fixtures"
)]

use pdserve_fabric::{
    CollectiveKind, DispatchPath, ExpertPlacement, Fabric, FabricConfig, FabricError,
    HardwareProfile, LayerRouting, Mode, ModelShape, Phase, RoutingKindName, Scenario, Schedule,
    StepBatch, StepInput, isolated_collective_us,
};

fn scenario(name: &str, layers: usize) -> Scenario {
    let mut s = Scenario::load(name).unwrap();
    s.routing.layers = Some(layers);
    s
}

fn duration(s: &Scenario) -> f64 {
    s.build().unwrap().run(false).unwrap().duration_us
}

#[test]
fn tbo_beats_a_single_batch_at_ep144_when_communication_matters() {
    let mut s = scenario("decode-ep144", 4);
    let tbo = duration(&s);
    s.schedule = Schedule::SingleBatch;
    let single = duration(&s);
    s.schedule = Schedule::SerialMicroBatches;
    let serial = duration(&s);
    assert!(tbo < 0.9 * single, "TBO {tbo} vs single {single}");
    assert!(
        tbo < serial && single < serial,
        "splitting without overlap only adds weight reads"
    );
}

#[test]
fn tbo_loses_to_a_single_batch_when_nvlink_makes_communication_cheap() {
    // On GB200 NVL72 the whole EP group is one NVLink domain: communication is short, and the
    // second micro-batch re-reads every weight, so overlap cannot pay for the split.
    let mut s = scenario("decode-gb200-nvl72", 4);
    let tbo = duration(&s);
    s.schedule = Schedule::SingleBatch;
    assert!(tbo > duration(&s));
}

#[test]
fn node_limited_routing_moves_fewer_nic_bytes_than_uniform_routing() {
    let mut s = scenario("decode-ep144", 2);
    s.ep_size = 64;
    s.placement.redundant_experts = 0;
    let nic = |s: &Scenario| s.build().unwrap().run(false).unwrap().nic_bytes();
    let limited = nic(&s);
    s.routing.kind = RoutingKindName::Uniform;
    let uniform = nic(&s);
    // At EP64 each node holds one group: ≤ 4 nodes per token instead of up to 8.
    assert!(limited < 0.75 * uniform, "{limited} vs {uniform}");
}

#[test]
fn forwarding_beats_direct_rdma_across_nodes() {
    let mut s = scenario("decode-ep144", 2);
    let run = s.build().unwrap();
    let ranges: Vec<(usize, usize)> = run
        .batch
        .ranks
        .iter()
        .map(|r| (0, r.tokens() as usize))
        .collect();
    let time = |run: &pdserve_fabric::ScenarioRun| {
        let plan = run
            .fabric
            .plan(&run.placements[0], &run.routing[0], &ranges, "r")
            .unwrap();
        isolated_collective_us(&run.fabric, &plan, CollectiveKind::Dispatch).unwrap()
    };
    let forwarded = time(&run);
    s.path = DispatchPath::Direct;
    let direct = time(&s.build().unwrap());
    assert!(forwarded < direct, "{forwarded} vs {direct}");
}

#[test]
fn the_same_routing_reused_gives_the_same_step_as_repeating_it() {
    let s = scenario("decode-ep144", 1);
    let run = s.build().unwrap();
    let once = run.run(false).unwrap().duration_us;
    let mut repeated = run.clone();
    repeated.routing = vec![run.routing[0].clone(); 58];
    repeated.placements = vec![run.placements[0].clone(); 58];
    assert_eq!(repeated.run(false).unwrap().duration_us, once);
}

#[test]
fn mtp_adds_one_moe_layer_and_time() {
    let mut s = scenario("decode-ep144", 2);
    let plain = s.build().unwrap().run(false).unwrap();
    s.mtp = true;
    let mtp = s.build().unwrap().run(false).unwrap();
    assert_eq!(mtp.layer_end_us.len(), plain.layer_end_us.len() + 1);
    assert_eq!(mtp.collectives.len(), plain.collectives.len() + 4);
    assert!(mtp.duration_us > plain.duration_us);
}

#[test]
fn prefill_runs_both_micro_batches_through_every_layer() {
    let s = scenario("prefill-ep32", 1);
    let out = s.build().unwrap().run(false).unwrap();
    assert_eq!(out.collectives.len(), 58 * 4);
    assert_eq!(out.tokens, 32 * 4 * 4096);
    // Prefill at 16K tokens per GPU is compute-bound: compute fills most of the step.
    assert!(out.compute_busy_us > 0.8 * out.duration_us);
}

#[test]
fn the_trace_has_a_track_per_compute_stream_comm_stream_and_link() {
    let mut s = scenario("decode-ep144", 1);
    s.ep_size = 16;
    s.placement.redundant_experts = 0;
    let out = s.build().unwrap().run(true).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&out.trace.unwrap().to_chrome_json()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"GPU 15 compute"));
    assert!(names.contains(&"GPU 0 comm"));
    assert!(names.contains(&"GPU 3 nic-rx"));
    assert!(names.contains(&"GPU 3 nvlink-tx"));
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "ATTN-1(1)" && e["ph"] == "X")
    );
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "DISPATCH(0)" && e["pid"] == 1)
    );
}

#[test]
fn a_prefilled_requests_kv_moves_at_the_nic_rate_plus_latency() {
    let fabric = Fabric::new(FabricConfig {
        profile: HardwareProfile::builtin("h800").unwrap(),
        shape: ModelShape::deepseek_v3().unwrap(),
        ep_size: 8,
        mode: Mode::Detailed,
        path: DispatchPath::Forwarded,
    })
    .unwrap();
    let kv = fabric.kv_transfer(4989, false, true);
    assert_eq!(kv.bytes, 4989.0 * 70_272.0);
    assert!((kv.duration_us - (3.7 + kv.bytes / 40e3)).abs() < 1e-6);
    // With the MTP layer's latent cache: 62 layers.
    assert_eq!(fabric.kv_transfer(1, true, true).bytes, 576.0 * 62.0 * 2.0);
}

fn small_fabric() -> Fabric {
    Fabric::new(FabricConfig {
        profile: HardwareProfile::builtin("h800").unwrap(),
        shape: ModelShape::deepseek_v3().unwrap(),
        ep_size: 16,
        mode: Mode::Detailed,
        path: DispatchPath::Forwarded,
    })
    .unwrap()
}

fn try_step(
    fabric: &Fabric,
    batch: &StepBatch,
    routing: &[LayerRouting],
    placement: &ExpertPlacement,
) -> Result<pdserve_fabric::StepOutcome, FabricError> {
    fabric.simulate_step(&StepInput {
        phase: Phase::Decode,
        batch,
        routing,
        mtp_routing: None,
        placements: std::slice::from_ref(placement),
        schedule: Schedule::TwoBatchOverlap,
        mtp: false,
        record_trace: false,
    })
}

fn routing_for(batch: &StepBatch, expert: u16) -> LayerRouting {
    let tokens = batch.tokens_per_rank();
    let total: u32 = tokens.iter().sum();
    let ids: Vec<u16> = (0..total)
        .flat_map(|_| (0..8).map(move |j| (expert + j) % 256))
        .collect();
    LayerRouting::new(8, &tokens, ids).unwrap()
}

#[test]
fn bad_input_is_an_error_naming_the_field_never_a_panic() {
    let f = small_fabric();
    let batch = StepBatch::uniform(16, 2, 100, 1);
    let good = ExpertPlacement::contiguous(256, 16).unwrap();
    let routing = routing_for(&batch, 0);
    assert!(try_step(&f, &batch, std::slice::from_ref(&routing), &good).is_ok());

    // A placement over more GPUs than the topology has.
    let wide = ExpertPlacement::contiguous(256, 32).unwrap();
    let err = try_step(&f, &batch, std::slice::from_ref(&routing), &wide)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("placement") && err.contains("num_gpus"),
        "{err}"
    );

    // An expert id the placement does not know.
    let tokens = batch.tokens_per_rank();
    let bad = LayerRouting::new(8, &tokens, vec![300; 8 * 32]).unwrap();
    let err = try_step(&f, &batch, std::slice::from_ref(&bad), &good)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routing[0]") && err.contains("expert 300"),
        "{err}"
    );

    // A batch with the wrong number of ranks.
    let short = StepBatch::uniform(8, 2, 100, 1);
    let err = try_step(&f, &short, std::slice::from_ref(&routing), &good)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch") && err.contains("ranks"), "{err}");

    // Routing for fewer tokens than the batch has.
    let fewer = routing_for(&StepBatch::uniform(16, 1, 100, 1), 0);
    let err = try_step(&f, &batch, std::slice::from_ref(&fewer), &good)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokens_per_rank"), "{err}");

    // No routing at all.
    let err = try_step(&f, &batch, &[], &good).unwrap_err().to_string();
    assert!(err.contains("routing"), "{err}");
}

#[test]
fn a_topology_that_cannot_hold_the_placement_is_an_error() {
    // DeepSeek-V3 on one H800 node: 32 experts per GPU per layer need more than 80 GB.
    let f = Fabric::new(FabricConfig {
        profile: HardwareProfile::builtin("h800").unwrap(),
        shape: ModelShape::deepseek_v3().unwrap(),
        ep_size: 8,
        mode: Mode::Detailed,
        path: DispatchPath::Forwarded,
    })
    .unwrap();
    let batch = StepBatch::uniform(8, 2, 100, 1);
    let placement = ExpertPlacement::contiguous(256, 8).unwrap();
    let err = try_step(&f, &batch, &[routing_for(&batch, 0)], &placement)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpu.hbm_capacity_bytes") && err.contains("cannot hold"),
        "{err}"
    );
}

#[test]
fn an_unknown_profile_in_a_scenario_is_an_error() {
    let mut s = scenario("decode-ep144", 1);
    s.hardware = "h900".into();
    let err = s.build().unwrap_err().to_string();
    assert!(err.contains("h900") && err.contains("h800"), "{err}");
}

/// The outcome and the trace of a step as JSON, with plans built on `threads` threads.
fn step_json(run: &mut pdserve_fabric::ScenarioRun, threads: usize) -> (String, String) {
    run.fabric = run.fabric.clone().with_plan_threads(threads);
    assert_eq!(run.fabric.plan_threads(), threads);
    let out = run.run(true).unwrap();
    let trace = serde_json::to_string(out.trace.as_ref().unwrap()).unwrap();
    (serde_json::to_string(&out).unwrap(), trace)
}

#[test]
fn plans_built_on_any_number_of_threads_give_bit_identical_outcomes_and_traces() {
    // 4 nodes, 7 distinct routing layers (14 plans) plus the MTP layer; prefill over 4 nodes.
    let mut decode = scenario("decode-ep144", 7);
    decode.ep_size = 32;
    decode.mtp = true;
    let prefill = scenario("prefill-ep32", 3);
    for s in [&decode, &prefill] {
        let mut run = s.build().unwrap();
        let one = step_json(&mut run, 1);
        for threads in [2, 4, 16] {
            let many = step_json(&mut run, threads);
            assert!(one.0 == many.0, "outcome differs with {threads} threads");
            assert!(one.1 == many.1, "trace differs with {threads} threads");
        }
    }
}

#[test]
fn the_first_plan_error_is_the_same_for_any_number_of_threads() {
    let batch = StepBatch::uniform(16, 2, 100, 1);
    let good = ExpertPlacement::contiguous(256, 16).unwrap();
    let tokens = batch.tokens_per_rank();
    let bad = |expert: u16| LayerRouting::new(8, &tokens, vec![expert; 8 * 32]).unwrap();
    // Layers 2 and 4 name unknown experts: layer 2's plan is needed first.
    let routing = vec![
        routing_for(&batch, 0),
        routing_for(&batch, 8),
        bad(300),
        routing_for(&batch, 16),
        bad(400),
    ];
    let err = |threads: usize| {
        let f = small_fabric().with_plan_threads(threads);
        try_step(&f, &batch, &routing, &good)
            .unwrap_err()
            .to_string()
    };
    let one = err(1);
    assert!(
        one.contains("routing[2]") && one.contains("expert 300"),
        "{one}"
    );
    for threads in [2, 3, 8] {
        assert_eq!(err(threads), one, "{threads} threads");
    }
}

#[test]
fn zero_plan_threads_means_the_hosts_parallelism() {
    let f = small_fabric().with_plan_threads(3).with_plan_threads(0);
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        f.plan_threads(),
        host.min(pdserve_fabric::MAX_DEFAULT_PLAN_THREADS)
    );
}
