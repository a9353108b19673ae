//! Scenarios: a whole synthetic step (hardware, model, EP size, batch, routing, placement) as one
//! TOML document, for `pdserve sim step`, the docs' tables and the benchmark.
//!
//! Built-in scenarios live in `config/sim/*.toml` and are embedded by name; a user's file loads by
//! path. Unknown keys are errors. Everything random (routing, context lengths) is drawn from
//! `seed`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batch::{Phase, RankBatch, RequestSlot, StepBatch};
use crate::error::FabricError;
use crate::fabric::{Fabric, FabricConfig, Mode};
use crate::named;
use crate::placement::ExpertPlacement;
use crate::plan::DispatchPath;
use crate::profile::HardwareProfile;
use crate::routing::LayerRouting;
use crate::schedule::Schedule;
use crate::shape::ModelShape;
use crate::step::{StepInput, StepOutcome};
use crate::synthetic::{RoutingKind, SyntheticRouting};

const BUILTIN: &[(&str, &str)] = &[
    (
        "decode-ep144",
        include_str!("../../../config/sim/decode-ep144.toml"),
    ),
    (
        "decode-ep128-profile",
        include_str!("../../../config/sim/decode-ep128-profile.toml"),
    ),
    (
        "prefill-ep32",
        include_str!("../../../config/sim/prefill-ep32.toml"),
    ),
    (
        "decode-gb200-nvl72",
        include_str!("../../../config/sim/decode-gb200-nvl72.toml"),
    ),
    (
        "paper-h800",
        include_str!("../../../config/sim/paper-h800.toml"),
    ),
];

/// A synthetic step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Hardware profile: a built-in name or a TOML path.
    #[serde(default = "default_hardware")]
    pub hardware: String,
    /// Modeled model: a built-in shape name or a `config.json` path.
    #[serde(default = "default_model")]
    pub model: String,
    /// `analysis` or `detailed`.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// `forwarded` (DeepEP normal kernels) or `direct` (DeepEP low-latency V1).
    #[serde(default = "default_path")]
    pub path: DispatchPath,
    /// `decode` or `prefill`.
    #[serde(default = "default_phase")]
    pub phase: Phase,
    /// `two-batch-overlap` (TBO on), `single-batch` (TBO off) or `serial-micro-batches`.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// GPUs in the EP group.
    pub ep_size: u32,
    /// Run the MTP module (decode).
    #[serde(default)]
    pub mtp: bool,
    /// Seed of everything random.
    #[serde(default)]
    pub seed: u64,
    /// The requests.
    pub batch: BatchSpec,
    /// How tokens choose experts.
    pub routing: RoutingSpec,
    /// Where experts live.
    #[serde(default)]
    pub placement: PlacementSpec,
    /// Overrides of the profile's efficiency factors.
    #[serde(default)]
    pub efficiency: EfficiencyOverrides,
}

/// Requests per GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Requests on each GPU.
    pub requests_per_gpu: u32,
    /// Tokens each request has in its KV cache before the step.
    pub cached_tokens: u32,
    /// Tokens each request adds (1 for decode; the prompt chunk for prefill; 2 with MTP).
    #[serde(default = "one_u32")]
    pub new_tokens: u32,
    /// Spread of `cached_tokens`: each request draws uniformly in `cached × [1 − s, 1 + s]`.
    #[serde(default)]
    pub cached_tokens_spread: f64,
}

/// Synthetic routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSpec {
    /// `uniform`, `node-limited`, `skewed` or `balanced`.
    pub kind: RoutingKindName,
    /// Zipf exponent, only with `kind = "skewed"`.
    #[serde(default)]
    pub skew_exponent: Option<f64>,
    /// Distinct routing layers generated, reused cyclically over the modeled MoE layers (as a
    /// real model with fewer layers would be); default: one per modeled MoE layer.
    #[serde(default)]
    pub layers: Option<usize>,
}

/// The routing kinds by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingKindName {
    /// No group limit.
    Uniform,
    /// DeepSeek-V3's top-4-of-8 groups.
    NodeLimited,
    /// Group-limited with Zipf popularity.
    Skewed,
    /// Every expert equally loaded, no randomness.
    Balanced,
}

/// Expert placement.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// Redundant expert copies per layer, given to the most loaded experts of each routing layer.
    #[serde(default)]
    pub redundant_experts: u32,
}

/// Optional overrides of [`Efficiency`](crate::Efficiency).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficiencyOverrides {
    /// `efficiency.gemm_fp8`.
    pub gemm_fp8: Option<f64>,
    /// `efficiency.attention_bf16`.
    pub attention_bf16: Option<f64>,
    /// `efficiency.memory`.
    pub memory: Option<f64>,
    /// `efficiency.stage_overhead_us`.
    pub stage_overhead_us: Option<f64>,
    /// `efficiency.prefill_comm_sms`.
    pub prefill_comm_sms: Option<u32>,
    /// `efficiency.decode_comm_sms`.
    pub decode_comm_sms: Option<u32>,
}

fn default_hardware() -> String {
    "h800".into()
}
fn default_model() -> String {
    "deepseek-v3".into()
}
fn default_mode() -> Mode {
    Mode::Detailed
}
fn default_path() -> DispatchPath {
    DispatchPath::Forwarded
}
fn default_phase() -> Phase {
    Phase::Decode
}
fn default_schedule() -> Schedule {
    Schedule::TwoBatchOverlap
}
fn one_u32() -> u32 {
    1
}

/// A built scenario: everything [`Fabric::simulate_step`] needs.
#[derive(Debug, Clone)]
pub struct ScenarioRun {
    /// The fabric.
    pub fabric: Fabric,
    /// The batch.
    pub batch: StepBatch,
    /// Distinct routing layers.
    pub routing: Vec<LayerRouting>,
    /// One placement per routing layer.
    pub placements: Vec<ExpertPlacement>,
    /// Prefill or decode.
    pub phase: Phase,
    /// TBO on or off.
    pub schedule: Schedule,
    /// MTP module on.
    pub mtp: bool,
}

impl ScenarioRun {
    /// The step input, recording the trace when asked.
    pub fn input(&self, record_trace: bool) -> StepInput<'_> {
        StepInput {
            phase: self.phase,
            batch: &self.batch,
            routing: &self.routing,
            mtp_routing: None,
            placements: &self.placements,
            schedule: self.schedule,
            mtp: self.mtp,
            record_trace,
        }
    }

    /// Simulates the step.
    pub fn run(&self, record_trace: bool) -> Result<StepOutcome, FabricError> {
        self.fabric.simulate_step(&self.input(record_trace))
    }
}

impl Scenario {
    /// Names of the built-in scenarios.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// A built-in scenario by name, or else the TOML file at that path.
    pub fn load(name_or_path: &str) -> Result<Self, FabricError> {
        Self::from_toml_str(
            &named::builtin_or_file("step config", BUILTIN, name_or_path)?,
            name_or_path,
        )
    }

    /// Parses a scenario; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, FabricError> {
        toml::from_str(text).map_err(|e| FabricError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Loads the profile and shape and draws the batch, routing and placements.
    pub fn build(&self) -> Result<ScenarioRun, FabricError> {
        let origin = "scenario";
        let mut profile = HardwareProfile::load(&self.hardware)?;
        self.apply_overrides(&mut profile)?;
        let shape = ModelShape::load(&self.model)?;
        let fabric = Fabric::new(FabricConfig {
            profile,
            shape: shape.clone(),
            ep_size: self.ep_size,
            mode: self.mode,
            path: self.path,
        })?;
        let batch = self.batch(origin)?;
        let kind = match (self.routing.kind, self.routing.skew_exponent) {
            (RoutingKindName::Uniform, None) => RoutingKind::Uniform,
            (RoutingKindName::NodeLimited, None) => RoutingKind::NodeLimited,
            (RoutingKindName::Balanced, None) => RoutingKind::Balanced,
            (RoutingKindName::Skewed, Some(exponent)) => RoutingKind::Skewed { exponent },
            (RoutingKindName::Skewed, None) => {
                return Err(FabricError::invalid(
                    origin,
                    "routing.skew_exponent",
                    "is required with kind = \"skewed\"",
                ));
            }
            (_, Some(_)) => {
                return Err(FabricError::invalid(
                    origin,
                    "routing.skew_exponent",
                    "is only used with kind = \"skewed\"",
                ));
            }
        };
        let (routing, placements) = if shape.is_moe() {
            let layers = self
                .routing
                .layers
                .unwrap_or(shape.moe_layers().max(1) as usize);
            if layers == 0 {
                return Err(FabricError::invalid(
                    origin,
                    "routing.layers",
                    "must be at least 1",
                ));
            }
            let router = SyntheticRouting::for_shape(&shape, kind)?;
            let routing = router.generate_layers(&batch.tokens_per_rank(), self.seed, layers)?;
            let base = ExpertPlacement::contiguous(shape.n_routed_experts as u32, self.ep_size)?;
            let placements = routing
                .iter()
                .map(|r| {
                    let loads = expert_loads(r, shape.n_routed_experts as usize);
                    base.clone()
                        .with_redundant(self.placement.redundant_experts, Some(&loads))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (routing, placements)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(ScenarioRun {
            fabric,
            batch,
            routing,
            placements,
            phase: self.phase,
            schedule: self.schedule,
            mtp: self.mtp,
        })
    }

    fn apply_overrides(&self, profile: &mut HardwareProfile) -> Result<(), FabricError> {
        let o = &self.efficiency;
        let e = &mut profile.efficiency;
        if let Some(v) = o.gemm_fp8 {
            e.gemm_fp8 = v;
        }
        if let Some(v) = o.attention_bf16 {
            e.attention_bf16 = v;
        }
        if let Some(v) = o.memory {
            e.memory = v;
        }
        if let Some(v) = o.stage_overhead_us {
            e.stage_overhead_us = v;
        }
        if let Some(v) = o.prefill_comm_sms {
            e.prefill_comm_sms = v;
        }
        if let Some(v) = o.decode_comm_sms {
            e.decode_comm_sms = v;
        }
        profile
            .efficiency
            .validate("scenario", profile.gpu.sm_count)
    }

    fn batch(&self, origin: &str) -> Result<StepBatch, FabricError> {
        let b = &self.batch;
        if b.new_tokens == 0 {
            return Err(FabricError::invalid(
                origin,
                "batch.new_tokens",
                "must be at least 1",
            ));
        }
        if !(b.cached_tokens_spread.is_finite() && (0.0..=1.0).contains(&b.cached_tokens_spread)) {
            return Err(FabricError::invalid(
                origin,
                "batch.cached_tokens_spread",
                "must be in 0..=1",
            ));
        }
        if b.cached_tokens_spread == 0.0 {
            return Ok(StepBatch::uniform(
                self.ep_size,
                b.requests_per_gpu,
                b.cached_tokens,
                b.new_tokens,
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(u64::MAX);
        let ranks = (0..self.ep_size)
            .map(|_| RankBatch {
                requests: (0..b.requests_per_gpu)
                    .map(|_| {
                        let f = 1.0 + b.cached_tokens_spread * (2.0 * rng.random::<f64>() - 1.0);
                        RequestSlot {
                            cached_tokens: (f64::from(b.cached_tokens) * f).round() as u32,
                            new_tokens: b.new_tokens,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(StepBatch { ranks })
    }
}

/// Tokens routed to each expert in one layer.
pub fn expert_loads(routing: &LayerRouting, n_experts: usize) -> Vec<f64> {
    let mut loads = vec![0.0; n_experts];
    for r in 0..routing.num_ranks() {
        for &e in routing.experts_of(r, 0..routing.tokens_of(r)) {
            if let Some(l) = loads.get_mut(usize::from(e)) {
                *l += 1.0;
            }
        }
    }
    loads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_scenario_parses() {
        for name in Scenario::builtin_names() {
            Scenario::load(name).unwrap();
        }
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = Scenario::from_toml_str("ep_size = 8\nepsize = 8\n[batch]\nrequests_per_gpu = 1\ncached_tokens = 1\n[routing]\nkind = \"uniform\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("epsize"), "{err}");
    }

    #[test]
    fn a_skew_exponent_without_skew_is_an_error() {
        let mut s = Scenario::load("decode-ep144").unwrap();
        s.routing.skew_exponent = Some(1.0);
        let err = s.build().unwrap_err().to_string();
        assert!(err.contains("routing.skew_exponent"), "{err}");
    }
}
