//! The paper's numbers, reproduced through the step simulator in analysis mode and through the
//! detailed collective model (deterministic, exact within 0.5%).

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions fail loudly on bad fixtures"
)]

use pdserve_fabric::{
    CollectiveKind, DispatchPath, ExpertPlacement, Fabric, FabricConfig, HardwareProfile,
    LayerRouting, Mode, ModelShape, Phase, RoutingKind, Schedule, StepBatch, StepInput,
    SyntheticRouting,
};

fn within(actual: f64, expected: f64, rel: f64) -> bool {
    ((actual - expected) / expected).abs() <= rel
}

/// DeepSeek-V3's shape with another hidden size and number of routed experts.
fn shape(hidden: u64, experts: u64) -> ModelShape {
    let mut s = ModelShape::deepseek_v3().unwrap();
    s.hidden_size = hidden;
    s.n_routed_experts = experts;
    s.n_group = 1;
    s.topk_group = 1;
    s
}

/// Analysis-mode step: one expert per GPU, 2 micro-batches of 32 tokens per GPU, balanced routing.
fn analysis_step(profile: &str, hidden: u64, gpus: u32) -> f64 {
    let s = shape(hidden, u64::from(gpus));
    let fabric = Fabric::new(FabricConfig {
        profile: HardwareProfile::builtin(profile).unwrap(),
        shape: s.clone(),
        ep_size: gpus,
        mode: Mode::Analysis,
        path: DispatchPath::Forwarded,
    })
    .unwrap();
    let batch = StepBatch::uniform(gpus, 64, 4096, 1);
    let routing = SyntheticRouting::for_shape(&s, RoutingKind::Balanced)
        .unwrap()
        .generate_layers(&batch.tokens_per_rank(), 0, 3)
        .unwrap();
    let placement = ExpertPlacement::contiguous(gpus, gpus).unwrap();
    let outcome = fabric
        .simulate_step(&StepInput {
            phase: Phase::Decode,
            batch: &batch,
            routing: &routing,
            mtp_routing: None,
            placements: std::slice::from_ref(&placement),
            schedule: Schedule::TwoBatchOverlap,
            mtp: false,
            record_trace: false,
        })
        .unwrap();
    assert_eq!(outcome.layer_end_us.len(), 61);
    outcome.duration_us
}

#[test]
fn analysis_mode_step_on_h800_gives_14_76_ms_with_hidden_7000() {
    let tpot_us = analysis_step("h800", 7000, 256);
    assert!(within(tpot_us, 14_760.0, 0.005), "{tpot_us}");
    assert!(within(tpot_us / 61.0, 241.92, 0.005));
    assert!(within(tpot_us / 122.0, 120.96, 0.005));
    assert_eq!((1e6 / tpot_us).floor(), 67.0);
}

#[test]
fn analysis_mode_step_on_h800_gives_123_86_us_per_pass_with_hidden_7168() {
    let tpot_us = analysis_step("h800", 7168, 256);
    assert!(
        within(tpot_us / 122.0, 123.86, 0.005),
        "{}",
        tpot_us / 122.0
    );
}

#[test]
fn analysis_mode_step_on_gb200_nvl72_gives_0_82_ms() {
    let tpot_us = analysis_step("gb200-nvl72", 7000, 72);
    assert!(within(tpot_us / 122.0, 6.72, 0.005), "{}", tpot_us / 122.0);
    assert!(within(tpot_us / 61.0, 13.44, 0.005));
    assert!(within(tpot_us, 820.0, 0.005));
    assert!(within(1e6 / tpot_us, 1200.0, 0.02));
}

/// One token on GPU 0 of an EP72 group (9 H800 nodes, one expert per GPU) choosing 8 experts on
/// `nodes` distinct remote nodes; returns the NIC bytes and the dispatch time.
fn one_token_dispatch(nodes: u32, path: DispatchPath) -> (f64, f64) {
    let s = shape(7168, 72);
    let fabric = Fabric::new(FabricConfig {
        profile: HardwareProfile::builtin("h800").unwrap(),
        shape: s,
        ep_size: 72,
        mode: Mode::Detailed,
        path,
    })
    .unwrap();
    // Expert j lands on node 1 + (j mod nodes), GPU (j / nodes) of that node.
    let experts: Vec<u16> = (0..8u32)
        .map(|j| ((1 + j % nodes) * 8 + j / nodes) as u16)
        .collect();
    let mut tokens = vec![0u32; 72];
    tokens[0] = 1;
    let routing = LayerRouting::new(8, &tokens, experts).unwrap();
    let placement = ExpertPlacement::contiguous(72, 72).unwrap();
    let ranges: Vec<(usize, usize)> = tokens.iter().map(|&t| (0, t as usize)).collect();
    let plan = fabric
        .plan(&placement, &routing, &ranges, "routing")
        .unwrap();
    let r = fabric
        .simulate_collective(&plan, CollectiveKind::Dispatch, &[0.0; 72], false)
        .unwrap();
    let end = r.received_us.iter().copied().fold(0.0, f64::max);
    (r.nic_bytes, end)
}

#[test]
fn node_limited_routing_costs_m_nic_copies_against_8_without_it() {
    let t = 7168.0 + 56.0 * 4.0; // one FP8 token with its 1×128 FP32 scales
    let (direct_bytes, direct_us) = one_token_dispatch(4, DispatchPath::Direct);
    assert_eq!(direct_bytes, 8.0 * t);
    for m in 1..=8u32 {
        let (bytes, us) = one_token_dispatch(m, DispatchPath::Forwarded);
        assert_eq!(bytes, f64::from(m) * t, "M = {m}");
        // The sender's NIC serialises M copies at 40 GB/s, then IB latency, then (unless every
        // target is the same-index GPU, as with M = 8 here) an NVLink hop's latency.
        let nvlink_hop = if m < 8 { 3.33 } else { 0.0 };
        let expect = f64::from(m) * t / 40e3 + 2.8 + nvlink_hop;
        assert!(within(us, expect, 0.005), "M = {m}: {us} vs {expect}");
        assert!(us <= direct_us + 3.33);
    }
    // Direct RDMA to GPUs of another in-node index crosses planes: one NVLink latency more.
    assert!(
        within(direct_us, 8.0 * t / 40e3 + 2.8 + 3.33, 0.005),
        "{direct_us}"
    );
}
