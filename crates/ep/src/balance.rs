//! Balance of per-GPU load: the figure EPLB improves.
//!
//! For one MoE layer, let `L_g` be the tokens GPU `g` receives (its dispatch receive load). EP
//! time per layer is set by the busiest GPU, so the figures are:
//!
//! - **balancedness** = `mean_g L_g / max_g L_g`, in `(0, 1]`, 1 when perfectly balanced. This is
//!   the per-layer "balancedness" that SGLang and vLLM log for EPLB (DeepSeek's `eplb.py` reports
//!   no metric; its stated objective is to minimize the maximum GPU load).
//! - **max/mean** = `max_g L_g / mean_g L_g` = 1 / balancedness: how much longer the slowest GPU
//!   works than under perfect balance.
//!
//! A layer with no load at all counts as perfectly balanced (both figures 1).

use crate::EpError;
use crate::placement::ExpertPlacement;
use crate::stats::ExpertLoad;

/// Mean and max of per-GPU loads for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    /// Mean load over GPUs.
    pub mean: f64,
    /// Maximum load of a GPU.
    pub max: f64,
}

impl Balance {
    /// The balance of per-GPU loads (an empty slice has zero load).
    pub fn of(loads: &[f64]) -> Self {
        if loads.is_empty() {
            return Self {
                mean: 0.0,
                max: 0.0,
            };
        }
        let sum: f64 = loads.iter().sum();
        let max = loads.iter().copied().fold(0.0_f64, f64::max);
        Self {
            mean: sum / loads.len() as f64,
            max,
        }
    }

    /// The balance of per-GPU token counts.
    pub fn of_counts(counts: &[u64]) -> Self {
        let loads: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        Self::of(&loads)
    }

    /// `mean / max`, in `(0, 1]`; 1 when there is no load.
    pub fn balancedness(&self) -> f64 {
        if self.max > 0.0 {
            self.mean / self.max
        } else {
            1.0
        }
    }

    /// `max / mean`, at least 1; 1 when there is no load.
    pub fn max_over_mean(&self) -> f64 {
        if self.mean > 0.0 {
            self.max / self.mean
        } else {
            1.0
        }
    }
}

/// Per-layer balance of `load` under `placements` (one placement per layer), each expert's load
/// split equally over its replicas.
pub fn layer_balances(
    placements: &[ExpertPlacement],
    load: &ExpertLoad,
) -> Result<Vec<Balance>, EpError> {
    if placements.len() != load.num_layers() {
        return Err(EpError::field(
            "placements",
            format!(
                "{} placements for a load of {} layers",
                placements.len(),
                load.num_layers()
            ),
        ));
    }
    placements
        .iter()
        .zip(load.layers())
        .map(|(placement, layer)| Ok(Balance::of(&placement.expected_rank_loads(layer)?)))
        .collect()
}

/// Mean of per-layer balancedness, as SGLang reports it for a whole model; 1 for no layers.
pub fn mean_balancedness(balances: &[Balance]) -> f64 {
    if balances.is_empty() {
        return 1.0;
    }
    balances.iter().map(Balance::balancedness).sum::<f64>() / balances.len() as f64
}

/// Mean of per-layer max/mean ratios; 1 for no layers.
pub fn mean_max_over_mean(balances: &[Balance]) -> f64 {
    if balances.is_empty() {
        return 1.0;
    }
    balances.iter().map(Balance::max_over_mean).sum::<f64>() / balances.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancedness_is_mean_over_max_and_ratio_its_inverse() {
        // Two GPUs at 100 and 200 tokens: mean 150, max 200.
        let b = Balance::of(&[100.0, 200.0]);
        assert_eq!(b.mean, 150.0);
        assert_eq!(b.max, 200.0);
        assert!((b.balancedness() - 0.75).abs() < 1e-12);
        assert!((b.max_over_mean() - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn no_load_counts_as_perfect_balance() {
        let b = Balance::of_counts(&[0, 0, 0]);
        assert_eq!(b.balancedness(), 1.0);
        assert_eq!(b.max_over_mean(), 1.0);
        assert_eq!(Balance::of(&[]).balancedness(), 1.0);
    }

    #[test]
    fn layer_balances_split_a_replicated_expert_equally() {
        // 4 experts, 2 redundant slots, 2 ranks of 3 slots; expert 0 holds all the load and has
        // replicas on both ranks (slots 0 and 3).
        let cfg = crate::PlacementConfig {
            num_ranks: 2,
            num_logical_experts: 4,
            num_redundant_experts: 2,
            physical_to_logical: Some(vec![0, 1, 2, 0, 3, 1]),
            ..crate::PlacementConfig::default()
        };
        let placement = ExpertPlacement::from_config(&cfg).unwrap();
        let load = ExpertLoad::new(vec![vec![10.0, 0.0, 0.0, 0.0]]).unwrap();
        let balances = layer_balances(&[placement], &load).unwrap();
        assert_eq!(balances[0].max, 5.0);
        assert_eq!(mean_balancedness(&balances), 1.0);
    }

    #[test]
    fn layer_count_mismatch_is_an_error_naming_placements() {
        let load = ExpertLoad::new(vec![vec![1.0; 8]; 2]).unwrap();
        let placement = ExpertPlacement::contiguous(8, 2).unwrap();
        let err = layer_balances(&[placement], &load).unwrap_err();
        assert!(err.to_string().contains("placements"), "{err}");
    }
}
