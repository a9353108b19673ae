//! Prints the EPLB balance table of `docs/eplb.md`.
//!
//! For Zipf expert popularity (exponents 0.6 and 1.0; each MoE layer a different seeded
//! permutation of experts), it samples top-8 routing for 256 experts, feeds it to
//! `ExpertLoadStats`, plans placements with the `Rebalancer` (policy `auto` unless the row names
//! one), and then dispatches a *fresh* sample of tokens (round-robin replica choice) under the
//! default layout ("before": slot `p` holds expert `p mod 256`) and under EPLB's layout ("after"),
//! counting the tokens each GPU receives. Figures are means over layers of the per-layer max/mean GPU load and
//! balancedness (mean/max). "after, in-sample" is the expected max/mean on the very load EPLB
//! planned from.
//!
//! Run: `cargo run --release -p pdserve-ep --example eplb_table`

use pdserve_ep::synthetic::{sample_routing, zipf_weights};
use pdserve_ep::{
    Balance, EpError, ExpertPlacement, LoadWindow, PlacementConfig, PolicyChoice, Rebalancer,
    RebalancerConfig, layer_balances, mean_max_over_mean,
};

const NUM_EXPERTS: usize = 256;
const TOP_K: usize = 8;
const NUM_LAYERS: usize = 4;
const TOKENS: usize = 16_384;

/// One row: EP size, redundant experts, policy.
const SHAPES: [(usize, usize, PolicyChoice); 7] = [
    (8, 0, PolicyChoice::Auto),
    (8, 32, PolicyChoice::Auto),
    (32, 32, PolicyChoice::Auto),
    (32, 32, PolicyChoice::Global),
    (64, 64, PolicyChoice::Hierarchical),
    (64, 64, PolicyChoice::Auto),
    (144, 32, PolicyChoice::Auto),
];

struct Sample {
    /// Routing EPLB learns from, per layer.
    calibration: Vec<Vec<u32>>,
    /// Fresh routing the placements are judged on, per layer.
    evaluation: Vec<Vec<u32>>,
}

fn sample(exponent: f64) -> Result<Sample, EpError> {
    let mut calibration = Vec::new();
    let mut evaluation = Vec::new();
    for layer in 0..NUM_LAYERS as u64 {
        let weights = zipf_weights(NUM_EXPERTS, exponent, 1000 + layer)?;
        calibration.push(sample_routing(&weights, TOKENS, TOP_K, 2000 + layer)?);
        evaluation.push(sample_routing(&weights, TOKENS, TOP_K, 3000 + layer)?);
    }
    Ok(Sample {
        calibration,
        evaluation,
    })
}

/// Mean over layers of (max/mean, balancedness) of the tokens each GPU receives.
fn dispatched(placements: &[ExpertPlacement], routing: &[Vec<u32>]) -> Result<(f64, f64), EpError> {
    let mut ratio = 0.0;
    let mut balancedness = 0.0;
    for (placement, ids) in placements.iter().zip(routing) {
        // Tokens come from every rank in turn, as DP attention ranks would send them.
        let mut counts = vec![0_u64; placement.num_ranks()];
        for (chunk_index, chunk) in ids.chunks(TOP_K * 16).enumerate() {
            let source = chunk_index % placement.num_ranks();
            let physical = placement.map_routing(chunk, TOP_K, source)?;
            for (c, n) in counts
                .iter_mut()
                .zip(placement.rank_token_counts(&physical)?)
            {
                *c += n;
            }
        }
        let b = Balance::of_counts(&counts);
        ratio += b.max_over_mean();
        balancedness += b.balancedness();
    }
    let layers = placements.len() as f64;
    Ok((ratio / layers, balancedness / layers))
}

fn main() -> Result<(), EpError> {
    println!(
        "| Zipf s | EP | nodes | redundant | slots/GPU | policy | max/mean before | max/mean after \
         | after, in-sample | balancedness before | balancedness after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for exponent in [0.6, 1.0] {
        let sample = sample(exponent)?;
        for (num_ranks, redundant, policy) in SHAPES {
            let placement = PlacementConfig {
                num_ranks,
                num_logical_experts: NUM_EXPERTS,
                num_redundant_experts: redundant,
                ..PlacementConfig::default()
            };
            let config = RebalancerConfig {
                policy,
                window: LoadWindow::Cumulative,
                ..RebalancerConfig::default()
            };
            let rebalancer = Rebalancer::new(placement.clone(), config)?;
            let mut stats = rebalancer.new_stats(NUM_LAYERS)?;
            for (layer, ids) in sample.calibration.iter().enumerate() {
                stats.record(layer, ids, TOP_K)?;
            }
            stats.finish_step();
            let load = stats.snapshot();
            let after = rebalancer.placements_for(&load)?;
            let before = rebalancer.initial_placements(NUM_LAYERS)?;
            let in_sample = mean_max_over_mean(&layer_balances(&after, &load)?);
            let (ratio0, bal0) = dispatched(&before, &sample.evaluation)?;
            let (ratio1, bal1) = dispatched(&after, &sample.evaluation)?;
            println!(
                "| {exponent} | {num_ranks} | {} | {redundant} | {} | {:?} | {ratio0:.3} | \
                 {ratio1:.3} | {in_sample:.3} | {bal0:.3} | {bal1:.3} |",
                placement.num_nodes(),
                placement.num_physical_experts() / num_ranks,
                rebalancer.policy(),
            );
        }
    }
    Ok(())
}
