//! Wall time of one routed forward through the EP runtime vs the single-process experts.
//!
//! On the embedded tiny model (`config/models/tiny.json`: hidden 128, 256 experts of width 32,
//! top-8 of 8 groups), for batches of 64 and 256 tokens spread over the ranks, it times
//! `routed_forward` of MoE layer 1 with `LocalExperts` (all experts in one bank) and with an
//! `EpGroup` at EP1 (the transport's own overhead: the same single bank as `LocalExperts`), EP8 and
//! EP32 (compute threads 1 and 2). It prints the minimum and median wall time
//! over interleaved repetitions, and the process CPU time per call over consecutive calls (the
//! figure that stays meaningful when other processes load the host).
//!
//! Run: `cargo run --release -p pdserve-ep --example ep_forward_bench [-- CHECKPOINT_DIR]`
//! (default: the embedded tiny model, created on first use). Sets `RAYON_NUM_THREADS` to the
//! core count unless the environment sets it, as the `pdserve` binary does.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use pdserve_ep::{EpGroup, EpRuntimeConfig, PlacementConfig};
use pdserve_model::routing::route_logits;
use pdserve_model::{Checkpoint, LocalExperts, MoeExperts, Routing};

const REPS: usize = 41;
/// Consecutive calls per configuration for the CPU-time figure.
const CPU_REPS: usize = 150;
/// `/proc/self/stat` counts CPU time in ticks of 1/100 s on Linux.
const TICKS_PER_S: f64 = 100.0;
const LAYER: usize = 1;

/// SplitMix64 values in [-1, 1).
fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// (minimum, median) wall time in µs of each of `runs`, after two warm-up calls each. The
/// runs are interleaved (one call of each per round) so that load from other processes on the
/// host weighs on all of them alike.
fn time_us(runs: &[&dyn Fn() -> anyhow::Result<()>]) -> anyhow::Result<Vec<(f64, f64)>> {
    for f in runs {
        f()?;
        f()?;
    }
    let mut times = vec![Vec::with_capacity(REPS); runs.len()];
    for _ in 0..REPS {
        for (f, t) in runs.iter().zip(&mut times) {
            let t0 = Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[0], t[REPS / 2])
        })
        .collect())
}

/// CPU time (user + system) of the whole process so far, all threads (exited ones included),
/// in µs, from `/proc/self/stat`.
fn process_cpu_us() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_S * 1e6)
}

/// CPU µs per call of each of `runs` over [`CPU_REPS`] consecutive calls: unlike wall time, it
/// does not grow when other processes compete for the cores (it counts the spinning of idle
/// worker threads, though).
fn cpu_us(runs: &[&dyn Fn() -> anyhow::Result<()>]) -> anyhow::Result<Vec<f64>> {
    runs.iter()
        .map(|f| {
            let c0 = process_cpu_us()?;
            for _ in 0..CPU_REPS {
                f()?;
            }
            Ok((process_cpu_us()? - c0) / CPU_REPS as f64)
        })
        .collect()
}

#[expect(
    unsafe_code,
    reason = "set_var is unsafe only when other threads may read the environment concurrently; it \
              runs first thing in main, before any thread exists"
)]
fn configure_threads() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: single-threaded at this point (see the `expect` reason).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    n
}

fn main() -> anyhow::Result<()> {
    let threads = configure_threads();
    let dir = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => pdserve_model::tiny::ensure_default(None).context("preparing the tiny model")?,
    };
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let cpu = Device::Cpu;
    let spec = ckpt.config().moe()?;
    let h = ckpt.config().hidden_size;
    let local = LocalExperts::load(&ckpt, &cpu)?;
    println!(
        "checkpoint {} (hidden {h}, {} experts of width {}, top-{}), RAYON_NUM_THREADS={threads}, \
         median of {REPS}",
        dir.display(),
        spec.n_routed_experts,
        spec.expert_intermediate,
        spec.top_k
    );
    println!(
        "| batch | experts | D | redundant | compute threads | wall min µs | wall median µs | \
         CPU µs | CPU vs local |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let shapes = [(1, 0, 1), (8, 0, 1), (8, 0, 2), (32, 32, 1), (32, 32, 2)];
    let groups = shapes
        .iter()
        .map(|&(d, r, compute_threads)| {
            let config = EpRuntimeConfig {
                placement: PlacementConfig {
                    num_ranks: d,
                    num_redundant_experts: r,
                    ..PlacementConfig::default()
                },
                compute_threads,
                ..EpRuntimeConfig::default()
            };
            EpGroup::load(&ckpt, config, &cpu)
        })
        .collect::<Result<Vec<_>, _>>()?;
    for batch in [64usize, 256] {
        let x = Tensor::from_vec(seeded(batch * h, 1), (batch, h), &cpu)?;
        let logits = seeded(batch * spec.n_routed_experts, 2);
        let routing: Routing = route_logits(&logits, batch, None, &spec)?;
        // Tokens spread over the ranks round robin, as DP attention spreads requests.
        let views = groups
            .iter()
            .map(|g| {
                let d = g.ep_size();
                let ranks: Vec<u32> = (0..batch).map(|t| (t % d) as u32).collect();
                g.batch(&ranks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (x, routing) = (&x, &routing);
        let local_run = || -> anyhow::Result<()> {
            local.routed_forward(LAYER, x, routing)?;
            Ok(())
        };
        let ep_runs: Vec<_> = views
            .iter()
            .map(|v| {
                move || -> anyhow::Result<()> {
                    v.routed_forward(LAYER, x, routing)?;
                    Ok(())
                }
            })
            .collect();
        let mut runs: Vec<&dyn Fn() -> anyhow::Result<()>> = vec![&local_run];
        runs.extend(ep_runs.iter().map(|f| f as &dyn Fn() -> anyhow::Result<()>));
        let times = time_us(&runs)?;
        let cpu = cpu_us(&runs)?;
        let (min, med) = times[0];
        println!(
            "| {batch} | LocalExperts | 1 | 0 | - | {min:.0} | {med:.0} | {:.0} | 1.00 |",
            cpu[0]
        );
        for ((&(d, r, threads), &(min, med)), &c) in shapes.iter().zip(&times[1..]).zip(&cpu[1..]) {
            println!(
                "| {batch} | EpGroup | {d} | {r} | {threads} | {min:.0} | {med:.0} | {c:.0} | {:.2} |",
                c / cpu[0]
            );
        }
    }
    Ok(())
}
