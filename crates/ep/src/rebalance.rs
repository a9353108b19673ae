//! When to run EPLB, and with what: the [`Rebalancer`] policy object.
//!
//! DeepSeek adjusts redundant experts "periodically (e.g., every 10 minutes)" from online load
//! statistics. Here the period is counted in engine steps, and the decision is a pure function of
//! `(completed steps, statistics)`: the engine owns the statistics and applies the placements it is
//! handed (moving expert weights is the EP runtime's job).
//!
//! Invariants: a constructed [`Rebalancer`] has a valid group shape and a policy whose
//! preconditions hold for it, so planning can fail only on statistics of the wrong shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::EpError;
use crate::eplb::{EplbParams, EplbPolicy, rebalance_experts};
use crate::placement::{ExpertPlacement, PlacementConfig};
use crate::stats::{ExpertLoad, ExpertLoadStats, LoadWindow};

/// The EPLB policy to use, or `auto` to follow DeepSeek's rule ([`EplbPolicy::auto`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyChoice {
    /// Hierarchical for small EP whose nodes divide the groups, global otherwise
    /// ([`EplbPolicy::auto`]).
    #[default]
    Auto,
    /// Always hierarchical (an error at construction when the node count does not divide the
    /// group count or the groups do not divide the experts).
    Hierarchical,
    /// Always global.
    Global,
}

/// Rebalancing configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalancerConfig {
    /// Steps between periodic rebalances; 0 disables them (only the initial placement applies).
    pub period_steps: u64,
    /// Which EPLB policy to run.
    pub policy: PolicyChoice,
    /// Expert groups of the model's group-limited routing (DeepSeek-V3 `n_group` = 8); must
    /// divide the logical expert count for the hierarchical policy.
    pub num_expert_groups: usize,
    /// How the load statistics weigh past steps.
    pub window: LoadWindow,
    /// Load file (format: [`ExpertLoad`]) to plan the initial placement from; absent: the
    /// placement config's own layout.
    pub initial_load_file: Option<PathBuf>,
}

impl Default for RebalancerConfig {
    fn default() -> Self {
        Self {
            period_steps: 0,
            policy: PolicyChoice::Auto,
            num_expert_groups: 8,
            window: LoadWindow::default(),
            initial_load_file: None,
        }
    }
}

/// Decides when to re-run EPLB and turns load into per-layer placements.
///
/// The number of redundant experts, the group shape, shared-expert and replica policy come from
/// the [`PlacementConfig`]: the redundant count fixes the physical slots each GPU allocates, so it
/// is a property of the deployment that rebalancing cannot change.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    placement: PlacementConfig,
    config: RebalancerConfig,
    params: EplbParams,
    policy: EplbPolicy,
}

impl Rebalancer {
    /// Validates both configs and resolves the policy.
    pub fn new(placement: PlacementConfig, config: RebalancerConfig) -> Result<Self, EpError> {
        // Validates the shape and any explicit map.
        ExpertPlacement::from_config(&placement)?;
        if config.num_expert_groups == 0 {
            return Err(EpError::field(
                "rebalancer.num_expert_groups",
                "must be at least 1",
            ));
        }
        // Checks the window's parameters.
        ExpertLoadStats::new(1, 1, config.window)?;
        let params = EplbParams {
            num_physical_experts: placement.num_physical_experts(),
            num_groups: config.num_expert_groups,
            num_nodes: placement.num_nodes(),
            num_gpus: placement.num_ranks,
        };
        let auto = EplbPolicy::auto(&params, placement.num_logical_experts);
        let policy = match config.policy {
            PolicyChoice::Auto => auto,
            PolicyChoice::Global => EplbPolicy::Global,
            PolicyChoice::Hierarchical
                if EplbPolicy::hierarchical_fits(&params, placement.num_logical_experts) =>
            {
                EplbPolicy::Hierarchical
            }
            PolicyChoice::Hierarchical => {
                return Err(EpError::field(
                    "rebalancer.policy",
                    format!(
                        "hierarchical needs the node count ({}) to divide num_expert_groups ({}) \
                         and the groups to divide the {} logical experts",
                        params.num_nodes, params.num_groups, placement.num_logical_experts
                    ),
                ));
            }
        };
        Ok(Self {
            placement,
            config,
            params,
            policy,
        })
    }

    /// The resolved policy.
    pub fn policy(&self) -> EplbPolicy {
        self.policy
    }

    /// The shape EPLB plans for.
    pub fn params(&self) -> &EplbParams {
        &self.params
    }

    /// The rebalancing config.
    pub fn config(&self) -> &RebalancerConfig {
        &self.config
    }

    /// The group's placement config.
    pub fn placement_config(&self) -> &PlacementConfig {
        &self.placement
    }

    /// Empty load statistics of the right shape and window for `num_layers` MoE layers.
    pub fn new_stats(&self, num_layers: usize) -> Result<ExpertLoadStats, EpError> {
        ExpertLoadStats::new(
            num_layers,
            self.placement.num_logical_experts,
            self.config.window,
        )
    }

    /// EPLB's placement of every layer of `load`.
    pub fn placements_for(&self, load: &ExpertLoad) -> Result<Vec<ExpertPlacement>, EpError> {
        if load.num_logical_experts() != self.placement.num_logical_experts {
            return Err(EpError::field(
                "num_logical_experts",
                format!(
                    "load has {} experts per layer, the placement config {}",
                    load.num_logical_experts(),
                    self.placement.num_logical_experts
                ),
            ));
        }
        rebalance_experts(load.layers(), &self.params, self.policy)?
            .iter()
            .map(|plan| ExpertPlacement::from_eplb(&self.placement, plan))
            .collect()
    }

    /// The placements to start with: planned from `initial_load_file` when configured (it must
    /// cover `num_layers` layers), else the placement config's layout for every layer.
    ///
    /// Reads the file; everything else here is pure.
    pub fn initial_placements(&self, num_layers: usize) -> Result<Vec<ExpertPlacement>, EpError> {
        match &self.config.initial_load_file {
            Some(path) => {
                let load = ExpertLoad::read(path)?;
                if load.num_layers() != num_layers {
                    return Err(EpError::field(
                        "rebalancer.initial_load_file",
                        format!(
                            "{} holds {} layers, the model has {num_layers} MoE layers",
                            path.display(),
                            load.num_layers()
                        ),
                    ));
                }
                self.placements_for(&load)
            }
            None => {
                let placement = ExpertPlacement::from_config(&self.placement)?;
                Ok(vec![placement; num_layers])
            }
        }
    }

    /// Whether a periodic rebalance falls after `completed_steps` steps.
    pub fn is_due(&self, completed_steps: u64) -> bool {
        let period = self.config.period_steps;
        period > 0 && completed_steps > 0 && completed_steps.is_multiple_of(period)
    }

    /// New placements when a periodic rebalance is due after `completed_steps` steps and `stats`
    /// holds some load; `None` otherwise.
    pub fn maybe_rebalance(
        &self,
        completed_steps: u64,
        stats: &ExpertLoadStats,
    ) -> Result<Option<Vec<ExpertPlacement>>, EpError> {
        if !self.is_due(completed_steps) {
            return Ok(None);
        }
        let load = stats.snapshot();
        if load.total() <= 0.0 {
            return Ok(None);
        }
        self.placements_for(&load).map(Some)
    }
}

#[cfg(test)]
mod tests;
