//! Golden outcomes: fixed-seed steps, plans and collectives whose every output is fingerprinted.
//!
//! The fingerprints were taken from the simulator before its hot paths were optimized; the
//! optimizations must not change a single bit of any simulated result. A fingerprint is FNV-1a
//! (over 8-byte words) of the outcome's JSON (`serde_json` writes every `f64` in its shortest
//! round-trip form) and of its recorded [`Trace`](pdserve_fabric::Trace) (whose Chrome JSON is a
//! function of it alone), so any change of any time, byte count or trace event changes it.
//! `PDSERVE_GOLDEN_PRINT=1 cargo test -p pdserve-fabric --test golden -- --nocapture` prints the
//! current values.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions fail loudly on bad fixtures"
)]

use pdserve_fabric::{
    CollectiveKind, DispatchPath, Fabric, FabricConfig, HardwareProfile, Mode, ModelShape,
    RoutingKind, RoutingKindName, Scenario, Schedule, StepBatch, SyntheticRouting, TrafficPlan,
};

/// FNV-1a over 8-byte words (the tail zero-padded), then the length.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    let mut mix = |w: u64| {
        *hash ^= w;
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    };
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        mix(u64::from_le_bytes(w.try_into().unwrap()));
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    mix(u64::from_le_bytes(last));
    mix(bytes.len() as u64);
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn print_mode() -> bool {
    std::env::var_os("PDSERVE_GOLDEN_PRINT").is_some()
}

/// The step's duration and a fingerprint of its outcome and trace.
fn step_fingerprint(s: &Scenario) -> (f64, u64) {
    let out = s.build().unwrap().run(true).unwrap();
    let mut h = FNV_OFFSET;
    fnv1a(&mut h, serde_json::to_string(&out).unwrap().as_bytes());
    fnv1a(
        &mut h,
        serde_json::to_string(out.trace.as_ref().unwrap())
            .unwrap()
            .as_bytes(),
    );
    (out.duration_us, h)
}

fn check_step(name: &str, s: &Scenario, want_duration_us: f64, want_hash: u64) {
    let (d, h) = step_fingerprint(s);
    if print_mode() {
        println!("{name}: {d:?}, {h:#018x}");
        return;
    }
    assert_eq!(d.to_bits(), want_duration_us.to_bits(), "{name}: {d:?}");
    assert_eq!(h, want_hash, "{name}: fingerprint {h:#018x}");
}

fn scenario(name: &str, layers: usize) -> Scenario {
    let mut s = Scenario::load(name).unwrap();
    s.routing.layers = Some(layers);
    s
}

#[test]
fn a_tbo_decode_step_at_ep144_is_bit_identical_to_the_reference() {
    check_step(
        "decode-ep144",
        &scenario("decode-ep144", 3),
        22465.613334839145,
        0x3f9e53711a8ab3c9,
    );
}

#[test]
fn decode_steps_with_other_schedules_paths_and_mtp_are_bit_identical_to_the_reference() {
    let mut s = scenario("decode-ep144", 2);
    s.schedule = Schedule::SingleBatch;
    check_step(
        "ep144 single-batch",
        &s,
        28469.493183862593,
        0xe41696406c7f687b,
    );
    let mut s = scenario("decode-ep144", 2);
    s.schedule = Schedule::SerialMicroBatches;
    s.mtp = true;
    s.seed = 7;
    check_step(
        "ep144 serial mtp",
        &s,
        37319.089548283715,
        0x2fe55218eb3c2b97,
    );
    let mut s = scenario("decode-ep144", 2);
    s.path = DispatchPath::Direct;
    check_step("ep144 direct", &s, 25889.108735542683, 0xf8f364f2ff6d3487);
}

#[test]
fn steps_across_leaves_and_with_skewed_or_uniform_routing_are_bit_identical_to_the_reference() {
    // EP320: 40 nodes over two leaves, so receive links mix latencies.
    let mut s = scenario("decode-ep144", 2);
    s.ep_size = 320;
    s.batch.requests_per_gpu = 8;
    s.routing.kind = RoutingKindName::Uniform;
    s.batch.cached_tokens_spread = 0.5;
    check_step("ep320 uniform", &s, 13726.644425869841, 0xb103ebbbb6a8e6c7);
    let mut s = scenario("decode-ep144", 2);
    s.ep_size = 64;
    s.routing.kind = RoutingKindName::Skewed;
    s.routing.skew_exponent = Some(1.2);
    s.placement.redundant_experts = 64;
    check_step("ep64 skewed", &s, 27535.92739644762, 0xcae430921c4e96b6);
}

#[test]
fn prefill_gb200_and_analysis_steps_are_bit_identical_to_the_reference() {
    let mut s = scenario("prefill-ep32", 1);
    s.batch.new_tokens = 512;
    check_step("prefill-ep32", &s, 178784.3452479638, 0x0928fee54c41e3ac);
    check_step(
        "decode-gb200-nvl72",
        &scenario("decode-gb200-nvl72", 2),
        10474.063571428547,
        0xdf438c902030d521,
    );
    check_step(
        "paper-h800",
        &Scenario::load("paper-h800").unwrap(),
        15111.290880000011,
        0xdd2a6fd1e7b65de2,
    );
}

/// A plan in canonical form: every flow as (src, dst, units, forwarded, latency bits), sorted,
/// plus the per-GPU counts.
fn plan_fingerprint(plan: &TrafficPlan) -> u64 {
    let mut h = FNV_OFFSET;
    for set in [&plan.nic, &plan.nvlink] {
        let mut flows: Vec<(u32, u32, u32, bool, u64)> = set
            .flows()
            .map(|f| (f.src, f.dst, f.units, f.forwarded, f.latency_us.to_bits()))
            .collect();
        flows.sort_unstable();
        fnv1a(&mut h, format!("{flows:?}").as_bytes());
    }
    fnv1a(
        &mut h,
        format!(
            "{:?}{:?}{:?}{:?}",
            plan.tokens, plan.pairs, plan.active_experts, plan.copies_out
        )
        .as_bytes(),
    );
    h
}

#[test]
fn plans_and_isolated_collectives_are_bit_identical_to_the_reference() {
    let mut got = Vec::new();
    for (ep, path, kind, redundant) in [
        (144, DispatchPath::Forwarded, RoutingKind::NodeLimited, 32),
        (144, DispatchPath::Direct, RoutingKind::NodeLimited, 32),
        (320, DispatchPath::Forwarded, RoutingKind::Uniform, 64),
        (72, DispatchPath::Forwarded, RoutingKind::Uniform, 0),
    ] {
        let hardware = if ep == 72 { "gb200-nvl72" } else { "h800" };
        let shape = ModelShape::deepseek_v3().unwrap();
        let fabric = Fabric::new(FabricConfig {
            profile: HardwareProfile::builtin(hardware).unwrap(),
            shape: shape.clone(),
            ep_size: ep,
            mode: Mode::Detailed,
            path,
        })
        .unwrap();
        let batch = StepBatch::uniform(ep, 24, 1024, 1);
        let tokens = batch.tokens_per_rank();
        let routing = SyntheticRouting::for_shape(&shape, kind)
            .unwrap()
            .generate(&tokens, 11, 3)
            .unwrap();
        let loads = pdserve_fabric::expert_loads(&routing, 256);
        let placement = pdserve_fabric::ExpertPlacement::contiguous(256, ep)
            .unwrap()
            .with_redundant(redundant, Some(&loads))
            .unwrap();
        let ranges: Vec<(usize, usize)> = tokens.iter().map(|&t| (3, t as usize - 2)).collect();
        let plan = fabric.plan(&placement, &routing, &ranges, "r").unwrap();
        let mut h = plan_fingerprint(&plan);
        // Skewed issue times, so flows start at different times on shared receive links.
        let issue: Vec<f64> = (0..ep).map(|g| f64::from((g * 37) % 23) * 1.7).collect();
        for kind in [CollectiveKind::Dispatch, CollectiveKind::Combine] {
            let r = fabric
                .simulate_collective(&plan, kind, &issue, true)
                .unwrap();
            fnv1a(&mut h, format!("{r:?}").as_bytes());
        }
        got.push(h);
    }
    if print_mode() {
        println!("plans: {got:#018x?}");
        return;
    }
    assert_eq!(
        got,
        [
            0x7047d021a2144115u64,
            0xf2453f494a11212a,
            0x53a37e06a6dab407,
            0xf9853535f6ab79ab
        ],
        "{got:#018x?}"
    );
}
