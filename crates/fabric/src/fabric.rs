//! [`Fabric`]: a modeled EP group (hardware, topology, shape, mode) that prices steps,
//! collectives and KV transfers.
//!
//! A `Fabric` is immutable and cheap to share; every method is a pure function of its inputs.

use serde::{Deserialize, Serialize};

use crate::cost::CostModel;
use crate::error::FabricError;
use crate::network::{CollectiveKind, CollectiveResult, CollectiveSim, CommModel};
use crate::placement::ExpertPlacement;
use crate::plan::{DispatchPath, TrafficPlan};
use crate::profile::{AnalysisLink, HardwareProfile};
use crate::routing::LayerRouting;
use crate::shape::{BF16_BYTES, FP8_BYTES, ModelShape};
use crate::topology::Topology;

/// FP8 activations carry one FP32 scale per 1×128 tile (deepseek-facts.md §1.9: tile-wise 1×128
/// activation quantization; the 4-byte scale is DeepEP's layout, not in the facts file).
pub const DISPATCH_SCALE_BYTES_PER_128: u64 = 4;

/// Which assumptions price a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The paper's: every copy (8 routed + 1 shared) at the nominal EP link bandwidth, no latency,
    /// compute fully hidden, FP8 dispatch and BF16 combine, every layer with EP traffic.
    Analysis,
    /// Topology, forwarding, contention, latency, compute cost, dense layers without EP traffic.
    Detailed,
}

/// What a [`Fabric`] is built from.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// The hardware.
    pub profile: HardwareProfile,
    /// The modeled model.
    pub shape: ModelShape,
    /// GPUs in the EP group (each also a DP attention rank).
    pub ep_size: u32,
    /// Analysis or detailed.
    pub mode: Mode,
    /// How dispatch crosses NVLink domains (detailed mode).
    pub path: DispatchPath,
}

/// A modeled EP group.
#[derive(Debug, Clone)]
pub struct Fabric {
    pub(crate) profile: HardwareProfile,
    pub(crate) shape: ModelShape,
    pub(crate) topology: Topology,
    pub(crate) cost: CostModel,
    pub(crate) comm: CommModel,
    pub(crate) mode: Mode,
    pub(crate) path: DispatchPath,
    /// Threads that build a step's traffic plans (1: on the calling thread, as needed).
    pub(crate) plan_threads: usize,
}

/// Most threads a step builds plans on by default.
pub const MAX_DEFAULT_PLAN_THREADS: usize = 8;

/// Bytes and time of one request's KV transfer from a prefill to a decode instance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KvTransfer {
    /// Tokens transferred.
    pub tokens: u64,
    /// Bytes transferred.
    pub bytes: f64,
    /// Time from the first byte sent to the last byte received, µs.
    pub duration_us: f64,
}

/// The host's available parallelism, at most [`MAX_DEFAULT_PLAN_THREADS`] (1 when unknown).
fn default_plan_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_DEFAULT_PLAN_THREADS)
}

impl Fabric {
    /// Builds the fabric; errors name the field at fault.
    pub fn new(config: FabricConfig) -> Result<Self, FabricError> {
        let FabricConfig {
            profile,
            shape,
            ep_size,
            mode,
            path,
        } = config;
        profile.validate(&profile.name)?;
        shape.validate("shape")?;
        let topology = Topology::new(&profile, ep_size)?;
        let hidden = shape.hidden_size as f64;
        let combine_bytes = hidden * BF16_BYTES as f64;
        let comm = match mode {
            Mode::Analysis => CommModel::Analysis {
                bytes_per_us: match profile.analysis_link() {
                    AnalysisLink::ScaleOut => profile.scale_out.nic_bytes_per_s,
                    AnalysisLink::ScaleUp => profile.scale_up.unidirectional_bytes_per_s,
                } / 1e6,
                dispatch_bytes: hidden * FP8_BYTES as f64,
                combine_bytes,
            },
            Mode::Detailed => CommModel::Detailed {
                nic_bytes_per_us: profile.scale_out.effective_bytes_per_s / 1e6,
                nvlink_bytes_per_us: profile.scale_up.effective_bytes_per_s / 1e6,
                dispatch_bytes: hidden * FP8_BYTES as f64
                    + (shape.hidden_size.div_ceil(128) * DISPATCH_SCALE_BYTES_PER_128) as f64,
                combine_bytes,
            },
        };
        let cost = CostModel::new(&profile, &shape);
        Ok(Self {
            profile,
            shape,
            topology,
            cost,
            comm,
            mode,
            path,
            plan_threads: default_plan_threads(),
        })
    }

    /// The same fabric building each step's traffic plans on `threads` threads; 0 restores the
    /// default (the host's available parallelism, at most [`MAX_DEFAULT_PLAN_THREADS`]).
    ///
    /// Plans are pure functions of routing, placement and token ranges, and the step consumes
    /// them in a fixed order, so every outcome and trace is bit-identical for any thread count.
    #[must_use]
    pub fn with_plan_threads(mut self, threads: usize) -> Self {
        self.plan_threads = if threads == 0 {
            default_plan_threads()
        } else {
            threads
        };
        self
    }

    /// Threads that build a step's traffic plans.
    pub fn plan_threads(&self) -> usize {
        self.plan_threads
    }

    /// The hardware profile.
    pub fn profile(&self) -> &HardwareProfile {
        &self.profile
    }

    /// The modeled shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The compute cost model.
    pub fn cost_model(&self) -> &CostModel {
        &self.cost
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The dispatch path.
    pub fn path(&self) -> DispatchPath {
        self.path
    }

    /// Checks that `placement` fits this EP group: same GPU count, the shape's experts, and the
    /// weights of the fullest GPU within HBM.
    pub fn check_placement(
        &self,
        placement: &ExpertPlacement,
        mtp: bool,
    ) -> Result<(), FabricError> {
        let n = self.topology.num_gpus();
        if placement.num_gpus() != n {
            return Err(FabricError::invalid(
                "placement",
                "num_gpus",
                format!(
                    "covers {} GPUs but the EP group has {n}",
                    placement.num_gpus()
                ),
            ));
        }
        if placement.num_experts() as u64 != self.shape.n_routed_experts {
            return Err(FabricError::invalid(
                "placement",
                "replicas",
                format!(
                    "places {} experts but the modeled shape has {}",
                    placement.num_experts(),
                    self.shape.n_routed_experts
                ),
            ));
        }
        let fullest = placement.slots_per_gpu().into_iter().max().unwrap_or(0);
        let need = self.cost.weight_bytes_per_gpu(fullest, mtp);
        if need > self.profile.gpu.hbm_capacity_bytes {
            return Err(FabricError::invalid(
                "placement",
                "gpu.hbm_capacity_bytes",
                format!(
                    "the topology cannot hold the placement: a GPU with {fullest} experts per layer needs \
                     {:.1} GB of weights, {} has {:.1} GB",
                    need / 1e9,
                    self.profile.name,
                    self.profile.gpu.hbm_capacity_bytes / 1e9
                ),
            ));
        }
        Ok(())
    }

    /// The traffic plan of tokens `ranges[r]` of every rank `r` of `routing`.
    pub fn plan(
        &self,
        placement: &ExpertPlacement,
        routing: &LayerRouting,
        ranges: &[(usize, usize)],
        origin: &str,
    ) -> Result<TrafficPlan, FabricError> {
        let n = self.topology.num_gpus() as usize;
        if placement.num_gpus() as usize != n {
            return Err(FabricError::invalid(
                "placement",
                "num_gpus",
                format!(
                    "covers {} GPUs but the EP group has {n}",
                    placement.num_gpus()
                ),
            ));
        }
        if routing.num_ranks() != n || ranges.len() != n {
            return Err(FabricError::invalid(
                origin,
                "ranks",
                format!(
                    "covers {} ranks for an EP group of {n} GPUs",
                    routing.num_ranks()
                ),
            ));
        }
        for (r, &(lo, hi)) in ranges.iter().enumerate() {
            if lo > hi || hi > routing.tokens_of(r) {
                return Err(FabricError::invalid(
                    origin,
                    format!("tokens_per_rank[{r}]"),
                    format!("has {} tokens, the batch needs {hi}", routing.tokens_of(r)),
                ));
            }
        }
        TrafficPlan::build(
            &self.topology,
            placement,
            routing,
            ranges,
            self.path,
            origin,
        )
    }

    /// Runs one collective of `plan` with GPU `g` issuing at `issue_us[g]`.
    pub fn simulate_collective(
        &self,
        plan: &TrafficPlan,
        kind: CollectiveKind,
        issue_us: &[f64],
        record_links: bool,
    ) -> Result<CollectiveResult, FabricError> {
        if issue_us.len() != plan.num_gpus() || plan.num_gpus() != self.topology.num_gpus() as usize
        {
            return Err(FabricError::invalid(
                "collective",
                "issue_us",
                format!(
                    "has {} entries for {} GPUs",
                    issue_us.len(),
                    self.topology.num_gpus()
                ),
            ));
        }
        if let Some(g) = issue_us.iter().position(|t| !t.is_finite()) {
            return Err(FabricError::invalid(
                "collective",
                format!("issue_us[{g}]"),
                "must be finite",
            ));
        }
        let sim = CollectiveSim {
            model: &self.comm,
            record_links,
        };
        Ok(sim.run(plan, kind, issue_us))
    }

    /// KV bytes of `tokens` tokens at the modeled shape (BF16 latent for MLA), with the MTP
    /// module's layer when `mtp`.
    pub fn kv_bytes(&self, tokens: u64, mtp: bool) -> f64 {
        let layers = self.shape.num_hidden_layers
            + if mtp {
                self.shape.num_nextn_predict_layers
            } else {
                0
            };
        (tokens * self.shape.kv_elements_per_token_per_layer() * layers * BF16_BYTES) as f64
    }

    /// One prefilled request's KV transfer to a decode instance over one NIC: in detailed mode at
    /// the effective NIC bandwidth plus the IB latency (cross leaf when `cross_leaf`), in analysis
    /// mode at the nominal bandwidth with no latency. Contention between concurrent transfers is
    /// the caller's to model, with a [`LinkSim`](crate::LinkSim) from [`Fabric::nic_link`].
    pub fn kv_transfer(&self, tokens: u64, mtp: bool, cross_leaf: bool) -> KvTransfer {
        let bytes = self.kv_bytes(tokens, mtp);
        let out = &self.profile.scale_out;
        let duration_us = match self.mode {
            Mode::Analysis => bytes / out.nic_bytes_per_s * 1e6,
            Mode::Detailed => {
                let latency = if cross_leaf {
                    out.latency_cross_leaf_us
                } else {
                    out.latency_same_leaf_us
                };
                latency + bytes / out.effective_bytes_per_s * 1e6
            }
        };
        KvTransfer {
            tokens,
            bytes,
            duration_us,
        }
    }

    /// A link with one NIC direction's bandwidth and latency in this mode, for modeling concurrent
    /// KV transfers.
    pub fn nic_link(&self, cross_leaf: bool) -> Result<crate::LinkSim, FabricError> {
        let out = &self.profile.scale_out;
        match self.mode {
            Mode::Analysis => crate::LinkSim::new(out.nic_bytes_per_s, 0.0),
            Mode::Detailed => crate::LinkSim::new(
                out.effective_bytes_per_s,
                if cross_leaf {
                    out.latency_cross_leaf_us
                } else {
                    out.latency_same_leaf_us
                },
            ),
        }
    }
}
