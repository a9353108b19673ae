//! Reproducible experiments behind `pdserve sim sweep`, `pdserve sim deepep` and the tables in
//! `docs/fabric.md`: EP-size sweeps of a decode scenario, and single collectives against DeepEP's
//! published low-latency kernel measurements.
//!
//! Collective times reported here are *isolated*: every GPU issues the collective at time 0 on an
//! idle fabric, and the time is the last arrival. Step times come from the full step simulation.

use serde::Serialize;

use crate::batch::{Phase, StepBatch};
use crate::error::FabricError;
use crate::fabric::{Fabric, FabricConfig, Mode};
use crate::network::CollectiveKind;
use crate::placement::ExpertPlacement;
use crate::plan::{DispatchPath, TrafficPlan};
use crate::profile::HardwareProfile;
use crate::routing::LayerRouting;
use crate::scenario::{RoutingKindName, Scenario, ScenarioRun};
use crate::schedule::Schedule;
use crate::shape::ModelShape;
use crate::synthetic::{RoutingKind, SyntheticRouting};

/// DeepEP's low-latency kernels as first published (README at ebfe47e; deepseek-facts.md §4.2
/// \[P\]): (EP size, dispatch µs, combine µs) at 128 tokens per GPU, hidden 7168, top-8, FP8
/// dispatch, BF16 combine, one CX7 400 Gb/s NIC per H800.
pub const DEEPEP_LOW_LATENCY_V1: [(u32, f64, f64); 6] = [
    (8, 163.0, 318.0),
    (16, 173.0, 329.0),
    (32, 182.0, 350.0),
    (64, 186.0, 353.0),
    (128, 192.0, 369.0),
    (256, 194.0, 360.0),
];

/// Time of one isolated collective: every GPU issues at 0; the last arrival, µs.
pub fn isolated_collective_us(
    fabric: &Fabric,
    plan: &TrafficPlan,
    kind: CollectiveKind,
) -> Result<f64, FabricError> {
    Ok(isolated_collective_stats(fabric, plan, kind)?.0)
}

/// An isolated collective's (last, mean over GPUs) arrival, µs.
fn isolated_collective_stats(
    fabric: &Fabric,
    plan: &TrafficPlan,
    kind: CollectiveKind,
) -> Result<(f64, f64), FabricError> {
    let n = fabric.topology().num_gpus() as usize;
    let r = fabric.simulate_collective(plan, kind, &vec![0.0; n], false)?;
    let last = r.received_us.iter().copied().fold(0.0, f64::max);
    let mean = r.received_us.iter().sum::<f64>() / n.max(1) as f64;
    Ok((last, mean))
}

/// One row of the DeepEP comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeepEpRow {
    /// EP size.
    pub ep_size: u32,
    /// DeepEP's measured dispatch, µs.
    pub measured_dispatch_us: f64,
    /// DeepEP's measured combine, µs.
    pub measured_combine_us: f64,
    /// Detailed mode, direct path (every copy over the NIC, as the measured kernels): the last
    /// GPU to receive, µs.
    pub direct_dispatch_us: f64,
    /// Detailed mode, direct path, combine, last GPU, µs.
    pub direct_combine_us: f64,
    /// Detailed mode, direct path, dispatch, mean over GPUs, µs.
    pub direct_dispatch_mean_us: f64,
    /// Detailed mode, direct path, combine, mean over GPUs, µs.
    pub direct_combine_mean_us: f64,
    /// Detailed mode, forwarded path (NIC to the same index, then NVLink), µs.
    pub forwarded_dispatch_us: f64,
    /// Detailed mode, forwarded path, combine, µs.
    pub forwarded_combine_us: f64,
}

/// Simulates DeepEP's low-latency benchmark on `profile`: 128 tokens per GPU, uniform random
/// top-8 of 256 experts (seeded), contiguous placement, one collective of each kind.
pub fn deepep_comparison(
    profile: &HardwareProfile,
    seed: u64,
) -> Result<Vec<DeepEpRow>, FabricError> {
    let shape = ModelShape::deepseek_v3()?;
    let mut rows = Vec::new();
    for &(ep, dispatch, combine) in &DEEPEP_LOW_LATENCY_V1 {
        let tokens = vec![128u32; ep as usize];
        let routing = SyntheticRouting::for_shape(&shape, RoutingKind::Uniform)?
            .generate(&tokens, seed, 0)?;
        let placement = ExpertPlacement::contiguous(256, ep)?;
        let ranges: Vec<(usize, usize)> = tokens.iter().map(|&t| (0, t as usize)).collect();
        let mut times = [0.0; 4];
        let mut means = [0.0; 2];
        for (i, path) in [DispatchPath::Direct, DispatchPath::Forwarded]
            .into_iter()
            .enumerate()
        {
            let fabric = Fabric::new(FabricConfig {
                profile: profile.clone(),
                shape: shape.clone(),
                ep_size: ep,
                mode: Mode::Detailed,
                path,
            })?;
            let plan = fabric.plan(&placement, &routing, &ranges, "routing")?;
            let d = isolated_collective_stats(&fabric, &plan, CollectiveKind::Dispatch)?;
            let c = isolated_collective_stats(&fabric, &plan, CollectiveKind::Combine)?;
            times[2 * i] = d.0;
            times[2 * i + 1] = c.0;
            if path == DispatchPath::Direct {
                means = [d.1, c.1];
            }
        }
        rows.push(DeepEpRow {
            ep_size: ep,
            measured_dispatch_us: dispatch,
            measured_combine_us: combine,
            direct_dispatch_us: times[0],
            direct_combine_us: times[1],
            direct_dispatch_mean_us: means[0],
            direct_combine_mean_us: means[1],
            forwarded_dispatch_us: times[2],
            forwarded_combine_us: times[3],
        });
    }
    Ok(rows)
}

/// One point of an EP sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Profile name.
    pub hardware: String,
    /// EP size.
    pub ep_size: u32,
    /// Routing kind.
    pub routing: RoutingKindName,
    /// TBO on (two-batch overlap) or off (single batch).
    pub tbo: bool,
    /// Redundant experts added.
    pub redundant_experts: u32,
    /// `None` when the step ran; else why not (e.g. the weights do not fit).
    pub skipped: Option<String>,
    /// Isolated dispatch of one micro-batch (TBO) or of the batch, mean over routing layers, µs.
    pub dispatch_us: f64,
    /// Isolated combine, same, µs.
    pub combine_us: f64,
    /// NIC bytes per GPU per step.
    pub nic_bytes_per_gpu: f64,
    /// Step time = TPOT, µs.
    pub tpot_us: f64,
    /// Mean layer time, µs.
    pub layer_us: f64,
    /// Tokens/s per user (1 / TPOT).
    pub tokens_per_s_per_user: f64,
    /// Tokens/s per GPU.
    pub tokens_per_s_per_gpu: f64,
}

/// Redundant experts used at `ep` GPUs for 256 experts: fill empty GPUs when there are more GPUs
/// than experts (EP320: 64, as the TR's decode), else DeepSeek's 32 (DAY6).
pub fn default_redundancy(ep: u32, experts: u32) -> u32 {
    if ep > experts {
        ep - experts
    } else if ep == experts {
        0
    } else {
        32
    }
}

/// Runs `base` at each EP size, with node-limited and uniform routing, TBO on and off.
pub fn ep_sweep(base: &Scenario, eps: &[u32]) -> Result<Vec<SweepPoint>, FabricError> {
    let mut points = Vec::new();
    for &ep in eps {
        for routing in [RoutingKindName::NodeLimited, RoutingKindName::Uniform] {
            for tbo in [true, false] {
                let mut s = base.clone();
                s.ep_size = ep;
                s.routing.kind = routing;
                s.routing.skew_exponent = None;
                s.schedule = if tbo {
                    Schedule::TwoBatchOverlap
                } else {
                    Schedule::SingleBatch
                };
                s.placement.redundant_experts = default_redundancy(ep, 256);
                points.push(sweep_point(&s, tbo)?);
            }
        }
    }
    Ok(points)
}

fn sweep_point(s: &Scenario, tbo: bool) -> Result<SweepPoint, FabricError> {
    let run = s.build()?;
    let mut point = SweepPoint {
        hardware: run.fabric.profile().name.clone(),
        ep_size: s.ep_size,
        routing: s.routing.kind,
        tbo,
        redundant_experts: s.placement.redundant_experts,
        skipped: None,
        dispatch_us: 0.0,
        combine_us: 0.0,
        nic_bytes_per_gpu: 0.0,
        tpot_us: 0.0,
        layer_us: 0.0,
        tokens_per_s_per_user: 0.0,
        tokens_per_s_per_gpu: 0.0,
    };
    let outcome = match run.run(false) {
        Ok(o) => o,
        Err(e @ FabricError::Invalid { .. }) => {
            point.skipped = Some(e.to_string());
            return Ok(point);
        }
        Err(e) => return Err(e),
    };
    let (d, c) = isolated_means(&run, tbo)?;
    let n = f64::from(s.ep_size);
    point.dispatch_us = d;
    point.combine_us = c;
    point.nic_bytes_per_gpu = outcome.nic_bytes() / n;
    point.tpot_us = outcome.duration_us;
    point.layer_us = outcome.mean_layer_us();
    point.tokens_per_s_per_user = 1e6 / outcome.duration_us;
    point.tokens_per_s_per_gpu = outcome.tokens as f64 / n / (outcome.duration_us / 1e6);
    Ok(point)
}

/// Mean isolated dispatch and combine over the scenario's routing layers (at most 8), for the
/// first micro-batch when `tbo`, else the whole batch.
fn isolated_means(run: &ScenarioRun, tbo: bool) -> Result<(f64, f64), FabricError> {
    let ranges = ranges_of(&run.batch, run.phase, tbo);
    let layers: Vec<(&LayerRouting, &ExpertPlacement)> = run
        .routing
        .iter()
        .zip(run.placements.iter())
        .take(8)
        .collect();
    let (mut d, mut c) = (0.0, 0.0);
    for (routing, placement) in &layers {
        let plan = run.fabric.plan(placement, routing, &ranges, "routing")?;
        d += isolated_collective_us(&run.fabric, &plan, CollectiveKind::Dispatch)?;
        c += isolated_collective_us(&run.fabric, &plan, CollectiveKind::Combine)?;
    }
    let k = layers.len().max(1) as f64;
    Ok((d / k, c / k))
}

fn ranges_of(batch: &StepBatch, phase: Phase, first_micro_batch: bool) -> Vec<(usize, usize)> {
    batch
        .ranks
        .iter()
        .map(|r| {
            if first_micro_batch {
                (0, r.split_point(phase) as usize)
            } else {
                (0, r.tokens() as usize)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redundancy_fills_empty_gpus_or_adds_32() {
        assert_eq!(default_redundancy(320, 256), 64);
        assert_eq!(default_redundancy(256, 256), 0);
        assert_eq!(default_redundancy(144, 256), 32);
    }
}
