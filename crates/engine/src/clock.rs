//! [`FabricStepClock`]: prices an executed step on the simulated fabric (pdserve-fabric).
//!
//! For a plan and the [`StepRouting`] its execution produced, the clock builds the fabric's
//! [`StepBatch`] (per DP rank, the step's requests with their cached and new tokens, micro-batch 0's
//! requests first), one [`LayerRouting`] per real MoE layer from the real expert choices, the MTP
//! layer's routing, the placement and the schedule, and asks [`Fabric::simulate_step`] for the
//! step's timeline. Its duration is the step's simulated time.
//!
//! - **Routing reuse.** The modeled model usually has more MoE layers than the real one (DeepSeek-V3:
//!   58, or 61 in analysis mode, against the tiny model's 3); the fabric prices modeled MoE layer `i`
//!   with real MoE layer `i mod real`, in order, cyclically. [`FabricStepClock::routing_note`] states
//!   it for reports. [`RoutingSource::Balanced`] replaces the real choices by the fabric's
//!   perfectly balanced routing (the paper's assumption in its speed-limit analysis).
//! - **MTP layer.** The MTP module runs on the tokens it can draft from (one or two per decode), the
//!   fabric's MTP layer on the step's tokens; each request's MTP rows are laid over its main rows in
//!   order, cyclically (a request without MTP rows keeps its last main layer's choices).
//! - **Micro-batches.** With two-batch overlap the fabric splits each rank's tokens at the request
//!   boundary nearest half (each GPU splits its own requests, as DeepSeek's DP attention does);
//!   requests are ordered by the plan's micro-batch, so the split follows the plan's assignment
//!   wherever that assignment is balanced per rank.
//! - **Placement and replicas.** Contiguous (plus `redundant_experts` copies), or, when the
//!   executor's expert backend decides it (the EP runtime, after EPLB), the placement the step
//!   really ran with ([`StepRouting::placements`]), one per MoE layer. With the EP runtime every
//!   (token, expert) copy is also priced on the GPU the runtime served it on
//!   ([`StepRouting::served_gpus`], handed to the fabric with `LayerRouting::with_gpus`), so the
//!   priced dispatch and combine are the traffic that moved; with local experts the fabric
//!   chooses among replicas by its own rule. (MTP rows laid over main rows keep the GPUs of the
//!   MTP row they copy; a request without MTP rows is served by the fabric's rule.)
//! - **Schedule.** Two-batch overlap on (the plan has micro-batches): DeepSeek's 5-stage decode
//!   pipeline ([`Schedule::TwoBatchOverlap`]); off: [`Schedule::SingleBatch`].
//!
//! The clock is deterministic: the same plan and routing give the same duration.

use serde::{Deserialize, Serialize};

use pdserve_fabric::{
    DispatchPath, ExpertPlacement, Fabric, FabricConfig, FabricError, HardwareProfile,
    LayerRouting, Mode, ModelShape, Phase, RankBatch, RequestSlot, RoutingKind, Schedule,
    StepBatch, StepInput, StepOutcome, SyntheticRouting, Trace,
};

use crate::executor::StepClock;
use crate::model_exec::StepRouting;
use crate::plan::StepPlan;

/// Where the expert choices that price a step come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingSource {
    /// The real model's routing of the step.
    #[default]
    Real,
    /// The fabric's balanced routing (every expert equally loaded), as the paper's analysis assumes;
    /// the real choices are computed but do not price the step.
    Balanced,
}

/// The modeled cluster a clock prices steps on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// Hardware profile: a built-in name (`h800`, `h100`, `gb200-nvl72`) or a TOML path.
    pub hardware: String,
    /// Modeled model: a built-in shape (`deepseek-v3`, …) or a `config.json` path.
    pub model: String,
    /// Override of the modeled hidden size (the paper's "7K" is 7000; DeepSeek-V3's is 7168).
    pub hidden_size: Option<u64>,
    /// `analysis` (the paper's assumptions) or `detailed` (topology, contention, compute).
    pub mode: Mode,
    /// `forwarded` (DeepEP normal kernels) or `direct` (DeepEP low-latency V1).
    pub path: DispatchPath,
    /// `decode` or `prefill`: which stage program prices the step.
    pub phase: Phase,
    /// GPUs in the EP group, each a DP attention rank (the executor's `dp_ranks`).
    pub ep_size: u32,
    /// Redundant expert copies per layer, spread evenly over the experts (placement is contiguous
    /// otherwise).
    pub redundant_experts: u32,
    /// Expert choices that price the step.
    pub routing: RoutingSource,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            hardware: "h800".into(),
            model: "deepseek-v3".into(),
            hidden_size: None,
            mode: Mode::Detailed,
            path: DispatchPath::Forwarded,
            phase: Phase::Decode,
            ep_size: 8,
            redundant_experts: 0,
            routing: RoutingSource::Real,
        }
    }
}

/// Errors of the clock.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The fabric refused the configuration or the step (the message names the field).
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The step's routing cannot be priced; names what is wrong.
    #[error("step routing: {0}")]
    Routing(String),
    /// A setting is unusable; names the field.
    #[error("clock config: `{field}` {problem}")]
    Config {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The priced step.
#[derive(Clone, Debug)]
pub struct StepTiming {
    /// Simulated duration, ns.
    pub duration_ns: u64,
    /// The schedule that priced it.
    pub schedule: Schedule,
    /// Whether the MTP layer was priced.
    pub mtp: bool,
    /// The fabric's outcome (per-layer ends, collectives, busy times; no trace).
    pub outcome: StepOutcome,
}

/// Prices steps on a [`Fabric`]; see the module docs.
#[derive(Debug)]
pub struct FabricStepClock {
    fabric: Fabric,
    placement: ExpertPlacement,
    config: ClockConfig,
    record_next: bool,
    last: Option<StepTiming>,
    last_trace: Option<Trace>,
    errors_total: u64,
}

impl FabricStepClock {
    /// A clock for `config`: loads the profile and the shape, builds the fabric and a contiguous
    /// placement (plus `redundant_experts` copies) and checks that it fits the GPUs.
    pub fn new(config: ClockConfig) -> Result<Self, ClockError> {
        let profile = HardwareProfile::load(&config.hardware)?;
        let mut shape = ModelShape::load(&config.model)?;
        if let Some(h) = config.hidden_size {
            shape.hidden_size = h;
        }
        if config.ep_size == 0 {
            return Err(ClockError::Config {
                field: "ep_size",
                problem: "must be at least 1".into(),
            });
        }
        let fabric = Fabric::new(FabricConfig {
            profile,
            shape: shape.clone(),
            ep_size: config.ep_size,
            mode: config.mode,
            path: config.path,
        })?
        // The engine's compute thread prices steps while the model's matmuls use the other
        // cores; a serving step reuses the real layers' routing, so its plans are cheap (docs/
        // performance.md, Fabric) and building them on extra threads only adds contention.
        .with_plan_threads(1);
        let experts = u32::try_from(shape.n_routed_experts).map_err(|_| ClockError::Config {
            field: "model",
            problem: format!("{} routed experts is too many", shape.n_routed_experts),
        })?;
        if experts == 0 {
            return Err(ClockError::Config {
                field: "model",
                problem:
                    "the modeled shape has no routed experts: nothing for the EP fabric to price"
                        .into(),
            });
        }
        let placement = ExpertPlacement::contiguous(experts, config.ep_size)?
            .with_redundant(config.redundant_experts, None)?;
        fabric.check_placement(&placement, shape.num_nextn_predict_layers > 0)?;
        Ok(Self {
            fabric,
            placement,
            config,
            record_next: false,
            last: None,
            last_trace: None,
            errors_total: 0,
        })
    }

    /// Replaces the placement (e.g. the EP runtime's after rebalancing); checked against the fabric.
    pub fn set_placement(&mut self, placement: ExpertPlacement) -> Result<(), ClockError> {
        let mtp = self.fabric.shape().num_nextn_predict_layers > 0;
        self.fabric.check_placement(&placement, mtp)?;
        self.placement = placement;
        Ok(())
    }

    /// Checks that the real model's routing can be priced: its expert ids fit the modeled experts.
    pub fn check_real_model(&self, n_routed_experts: usize) -> Result<(), ClockError> {
        let modeled = self.fabric.shape().n_routed_experts;
        if n_routed_experts as u64 > modeled {
            return Err(ClockError::Config {
                field: "model",
                problem: format!(
                    "the real model routes over {n_routed_experts} experts but the modeled shape has \
                     only {modeled}"
                ),
            });
        }
        Ok(())
    }

    /// The fabric.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// The settings.
    pub fn config(&self) -> &ClockConfig {
        &self.config
    }

    /// The placement in use.
    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    /// Records the timeline of the next priced step ([`FabricStepClock::take_trace`]).
    pub fn record_next_step(&mut self) {
        self.record_next = true;
    }

    /// The recorded timeline, if any (export with [`Trace::to_chrome_json`]).
    pub fn take_trace(&mut self) -> Option<Trace> {
        self.last_trace.take()
    }

    /// The last priced step.
    pub fn last_timing(&self) -> Option<&StepTiming> {
        self.last.as_ref()
    }

    /// Steps the [`StepClock`] interface could not price (each returned its error).
    pub fn errors_total(&self) -> u64 {
        self.errors_total
    }

    /// Modeled MoE layers of the main model (every layer in analysis mode, as the paper counts).
    pub fn modeled_moe_layers(&self) -> u64 {
        let s = self.fabric.shape();
        match self.config.mode {
            Mode::Analysis => s.num_hidden_layers,
            Mode::Detailed => s.moe_layers(),
        }
    }

    /// One sentence on how the real routing prices the modeled layers, for reports.
    pub fn routing_note(&self, real_moe_layers: usize) -> String {
        let modeled = self.modeled_moe_layers();
        match self.config.routing {
            RoutingSource::Balanced => format!(
                "{modeled} modeled MoE layers priced with balanced routing (the paper's assumption); \
                 the real model's expert choices do not price the step"
            ),
            RoutingSource::Real => format!(
                "{modeled} modeled MoE layers priced with the real model's {real_moe_layers} MoE \
                 layers' routing, reused in order, cyclically"
            ),
        }
    }

    /// Prices `plan` given its routing; see the module docs. An idle plan costs 0.
    pub fn simulate<P>(
        &mut self,
        plan: &StepPlan<P>,
        routing: &StepRouting,
    ) -> Result<StepTiming, ClockError> {
        let record = std::mem::take(&mut self.record_next);
        let schedule = if plan.micro_batch_work.is_some() {
            Schedule::TwoBatchOverlap
        } else {
            Schedule::SingleBatch
        };
        let mtp = plan.spec_tokens > 0 && self.fabric.shape().num_nextn_predict_layers > 0;
        if plan.is_idle() || routing.num_rows == 0 {
            let timing = StepTiming {
                duration_ns: 0,
                schedule,
                mtp,
                outcome: StepOutcome {
                    duration_us: 0.0,
                    layer_end_us: Vec::new(),
                    stage_busy_us: Vec::new(),
                    collectives: Vec::new(),
                    compute_busy_us: 0.0,
                    tokens: 0,
                    trace: None,
                },
            };
            self.last = Some(timing.clone());
            return Ok(timing);
        }
        let layout = RankLayout::new(routing, self.config.ep_size)?;
        let tokens_per_rank = layout.batch.tokens_per_rank();
        let (layers, mtp_routing) = match self.config.routing {
            RoutingSource::Balanced => {
                let router =
                    SyntheticRouting::for_shape(self.fabric.shape(), RoutingKind::Balanced)?;
                (
                    router.generate_layers(&tokens_per_rank, 0, routing.layers.len().max(1))?,
                    None,
                )
            }
            RoutingSource::Real => {
                if routing.layers.is_empty() {
                    return Err(ClockError::Routing(
                        "the real model reported no MoE layer; use `routing = \"balanced\"` to price \
                         a dense model on an MoE shape"
                            .into(),
                    ));
                }
                let served =
                    |i: usize, rows: usize, top_k: usize| served_gpus(routing, i, rows * top_k);
                let layers = routing
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let served = served(i, routing.num_rows, l.routing.top_k)?;
                        layout.layer(&l.routing, served, &tokens_per_rank)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mtp_routing = match (&routing.mtp, routing.layers.last()) {
                    (Some(m), Some(last)) if mtp => {
                        let n = routing.layers.len();
                        let served = served(n, routing.num_mtp_rows, m.routing.top_k)?;
                        Some(layout.mtp_layer(
                            (&m.routing, served),
                            &last.routing,
                            &tokens_per_rank,
                        )?)
                    }
                    _ => None,
                };
                (layers, mtp_routing)
            }
        };
        let runtime_placements;
        let placements: &[ExpertPlacement] = match &routing.placements {
            None => std::slice::from_ref(&self.placement),
            Some(p) => {
                runtime_placements = placements_for(p, layers.len(), mtp_routing.is_some())?;
                &runtime_placements
            }
        };
        let mut outcome = self.fabric.simulate_step(&StepInput {
            phase: self.config.phase,
            batch: &layout.batch,
            routing: &layers,
            mtp_routing: mtp_routing.as_ref(),
            placements,
            schedule,
            mtp,
            record_trace: record,
        })?;
        if record {
            self.last_trace = outcome.trace.take();
        }
        let timing = StepTiming {
            duration_ns: (outcome.duration_us * 1e3).round().max(0.0) as u64,
            schedule,
            mtp,
            outcome,
        };
        self.last = Some(timing.clone());
        Ok(timing)
    }
}

impl<P> StepClock<P, StepRouting> for FabricStepClock {
    type Error = ClockError;

    /// The simulated duration ([`FabricStepClock::simulate`]); a step that cannot be priced is an
    /// error (and counted in [`FabricStepClock::errors_total`]).
    fn step_duration_ns(
        &mut self,
        plan: &StepPlan<P>,
        routing: &StepRouting,
    ) -> Result<u64, ClockError> {
        let timing = self.simulate(plan, routing);
        self.errors_total += u64::from(timing.is_err());
        Ok(timing?.duration_ns)
    }
}

/// The expert backend's placements (main MoE layers, then the MTP layer) for `layers` routing
/// layers and, when `mtp`, the MTP layer.
fn placements_for(
    all: &[ExpertPlacement],
    layers: usize,
    mtp: bool,
) -> Result<Vec<ExpertPlacement>, ClockError> {
    let need = layers + usize::from(mtp);
    if all.len() < need {
        return Err(ClockError::Routing(format!(
            "the expert backend gave {} placements for {layers} MoE layers{}",
            all.len(),
            if mtp { " and the MTP layer" } else { "" }
        )));
    }
    let mut chosen = all[..layers].to_vec();
    if mtp {
        chosen.extend(all.last().cloned());
    }
    Ok(chosen)
}

/// The GPUs that served routing layer `index`'s pairs (main MoE layers, then the MTP layer at
/// index `layers.len()`), checked to hold `pairs` entries; `None` when the executor's expert
/// backend moved no rows (the fabric then chooses replicas).
fn served_gpus(
    routing: &StepRouting,
    index: usize,
    pairs: usize,
) -> Result<Option<&[u32]>, ClockError> {
    let Some(all) = &routing.served_gpus else {
        return Ok(None);
    };
    match all.get(index) {
        Some(gpus) if gpus.len() == pairs => Ok(Some(gpus)),
        found => Err(ClockError::Routing(format!(
            "the expert backend reported {} served GPUs for MoE layer {index}, which has {pairs} \
             (row, expert) pairs",
            found.map_or(0, Vec::len)
        ))),
    }
}

/// One routing and, when recorded, the GPU that served each of its pairs.
type Served<'r> = (&'r pdserve_model::Routing, Option<&'r [u32]>);

/// The step's requests laid out per rank: the fabric's batch and, per rank, the routing rows in
/// the fabric's token order.
struct RankLayout {
    batch: StepBatch,
    /// Per rank, `(request index, index among the request's rows, main row)` of each token.
    rows: Vec<Vec<(usize, usize, usize)>>,
    /// MTP rows of each request.
    mtp_rows: Vec<std::ops::Range<usize>>,
}

impl RankLayout {
    fn new(routing: &StepRouting, ep_size: u32) -> Result<Self, ClockError> {
        let mut order: Vec<usize> = (0..routing.requests.len())
            .filter(|&i| !routing.requests[i].rows.is_empty())
            .collect();
        order.sort_by_key(|&i| {
            let r = &routing.requests[i];
            (r.rank, r.micro_batch, i)
        });
        let mut ranks = vec![RankBatch::default(); ep_size as usize];
        let mut rows = vec![Vec::new(); ep_size as usize];
        for i in order {
            let r = &routing.requests[i];
            let (Some(rank), Some(rank_rows)) = (
                ranks.get_mut(r.rank as usize),
                rows.get_mut(r.rank as usize),
            ) else {
                return Err(ClockError::Routing(format!(
                    "request {} is on DP rank {} but the EP group has {ep_size} GPUs (the executor's \
                     `dp_ranks` must equal the clock's `ep_size`)",
                    r.id, r.rank
                )));
            };
            if r.rows.end > routing.num_rows || r.mtp_rows.end > routing.num_mtp_rows {
                return Err(ClockError::Routing(format!(
                    "request {} has rows {:?} / MTP rows {:?} beyond the step's {} / {} rows",
                    r.id, r.rows, r.mtp_rows, routing.num_rows, routing.num_mtp_rows
                )));
            }
            rank.requests.push(RequestSlot {
                cached_tokens: u32::try_from(r.cached_tokens).unwrap_or(u32::MAX),
                new_tokens: r.rows.len() as u32,
            });
            rank_rows.extend(r.rows.clone().enumerate().map(|(j, row)| (i, j, row)));
        }
        Ok(Self {
            batch: StepBatch { ranks },
            rows,
            mtp_rows: routing
                .requests
                .iter()
                .map(|r| r.mtp_rows.clone())
                .collect(),
        })
    }

    /// A fabric routing of `top_k` experts per token whose token `(request, j, row)` takes the
    /// experts of the row `pick` names in the routing `pick` names, served by the GPUs recorded
    /// for that row (or the fabric's replica rule where none were recorded).
    fn fill<'r>(
        &self,
        top_k: usize,
        tokens_per_rank: &[u32],
        pick: impl Fn(usize, usize, usize) -> (Served<'r>, usize),
    ) -> Result<LayerRouting, ClockError> {
        let total: usize = self.rows.iter().map(Vec::len).sum();
        let mut experts = Vec::with_capacity(total * top_k);
        let mut gpus = Vec::with_capacity(total * top_k);
        let mut any_served = false;
        for rank_rows in &self.rows {
            for &(req, j, row) in rank_rows {
                let ((routing, served), src) = pick(req, j, row);
                if routing.top_k != top_k {
                    return Err(ClockError::Routing(format!(
                        "layers route to {} and {top_k} experts per token",
                        routing.top_k
                    )));
                }
                let pairs = src * top_k..(src + 1) * top_k;
                let ids = routing.ids.get(pairs.clone()).ok_or_else(|| {
                    ClockError::Routing(format!(
                        "row {src} is beyond the {} routed tokens of a layer",
                        routing.tokens()
                    ))
                })?;
                for &e in ids {
                    experts.push(u16::try_from(e).map_err(|_| {
                        ClockError::Routing(format!(
                            "expert id {e} does not fit the fabric's 16 bits"
                        ))
                    })?);
                }
                match served.and_then(|g| g.get(pairs)) {
                    Some(g) => {
                        gpus.extend_from_slice(g);
                        any_served = true;
                    }
                    None => gpus.extend(std::iter::repeat_n(LayerRouting::ANY_GPU, top_k)),
                }
            }
        }
        let layer = LayerRouting::new(top_k, tokens_per_rank, experts)?;
        Ok(if any_served {
            layer.with_gpus(gpus)?
        } else {
            layer
        })
    }

    /// One main MoE layer, row for row.
    fn layer(
        &self,
        routing: &pdserve_model::Routing,
        served: Option<&[u32]>,
        tokens_per_rank: &[u32],
    ) -> Result<LayerRouting, ClockError> {
        self.fill(routing.top_k, tokens_per_rank, |_, _, row| {
            ((routing, served), row)
        })
    }

    /// The MTP layer: each request's MTP rows laid over its main rows cyclically; a request without
    /// MTP rows keeps `fallback`'s (its last main layer's) choices, served by the fabric's rule
    /// (the MTP module moved no copy of them).
    fn mtp_layer(
        &self,
        mtp: Served<'_>,
        fallback: &pdserve_model::Routing,
        tokens_per_rank: &[u32],
    ) -> Result<LayerRouting, ClockError> {
        self.fill(mtp.0.top_k, tokens_per_rank, |req, j, row| {
            match self.mtp_rows.get(req).filter(|m| !m.is_empty()) {
                Some(m) => (mtp, m.start + j % m.len()),
                None => ((fallback, None), row),
            }
        })
    }
}
