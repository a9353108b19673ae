//! The shipped paper configs, run end to end by the decode benchmark (scheduler, the real tiny model,
//! the fabric clock in analysis mode): their simulated TPOT equals the paper's closed form —
//! 14.76 ms on H800 and 0.82 ms on GB200 NVL72 at the paper's "7K" = 7000 hidden size — within 1%.
//! Deterministic: analysis mode has no randomness and the balanced routing none either.

use std::path::{Path, PathBuf};

use pdserve_engine::decode_bench::BenchTime;
use pdserve_engine::{DecodeBenchConfig, DecodeBenchReport, run_decode_bench};

fn bench(config: &str) -> DecodeBenchReport {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../config")
        .join(config);
    let mut config = DecodeBenchConfig::load(&path).expect("config");
    // The golden tiny checkpoint: same routing structure as the embedded default, smaller.
    config.model_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/goldens/tiny"));
    config.steps = 1;
    let mut t = 0u64;
    let mut now = || {
        t += 1_000;
        t
    };
    let mut sleep = |_ns: u64| {};
    let mut time = BenchTime {
        now_ns: &mut now,
        sleep_ns: &mut sleep,
    };
    run_decode_bench(&config, &mut time, false).expect("bench")
}

fn within(actual: f64, expected: f64, rel: f64) -> bool {
    ((actual - expected) / expected).abs() <= rel
}

#[test]
fn paper_h800_config_reproduces_14_76_ms_tpot() {
    let r = bench("paper-h800.toml");
    assert_eq!((r.hidden_size, r.requests, r.ep_size), (7000, 1024, 16));
    assert_eq!(
        (r.output_tokens, r.decodes),
        (1024, 1024),
        "one token per request per step"
    );
    assert!(within(r.sim_tpot_ms, 14.76, 0.01), "{}", r.sim_tpot_ms);
    let analytic = r.analytic_tpot_ms.expect("analysis mode");
    assert!(
        within(r.sim_tpot_ms, analytic, 1e-9),
        "{} vs {analytic}",
        r.sim_tpot_ms
    );
    assert_eq!(r.sim_tokens_per_s_per_user.floor(), 67.0);
    assert!(r.routing_note.contains("balanced"), "{}", r.routing_note);
}

#[test]
fn paper_gb200_config_reproduces_0_82_ms_tpot() {
    let r = bench("paper-gb200-nvl72.toml");
    assert!(within(r.sim_tpot_ms, 0.82, 0.01), "{}", r.sim_tpot_ms);
    assert!(within(r.sim_tokens_per_s_per_user, 1200.0, 0.02));
}
