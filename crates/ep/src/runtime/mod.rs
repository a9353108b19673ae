//! The expert-parallel runtime: an EP group of `D` simulated GPUs that runs a model's routed
//! experts, implementing [`pdserve_model::MoeExperts`].
//!
//! Each rank of an [`EpGroup`] is a DP attention rank (the executor assigns it requests, and the
//! rows of those requests' tokens) and an EP rank that owns the weights of its experts for every
//! MoE layer, the MTP layer's included ([`EpRank`]). A token's hidden row reaches the experts it
//! chose only through the transport (dispatch) and comes back the same way (combine): real rows
//! are copied into per-rank receive buffers, each rank runs all its received (token, expert)
//! pairs in one grouped call, and each source sums what comes back in ascending rank order (the
//! `transport` module). [`LayerTraffic`] records every message per (source, destination) rank so
//! the fabric can charge that traffic at the modeled shape. Ranks share OS threads
//! ([`EpRuntimeConfig::compute_threads`]).
//!
//! **Token → rank.** The model calls `routed_forward(layer, hidden, routing)` with no notion of
//! ranks, so the executor says, before each model forward (main or MTP), which DP rank each token
//! row belongs to: either `group.set_token_ranks(&ranks)` and pass `&group` as the experts (an
//! interior per-forward context, kept until the next call or [`EpGroup::finish_step`]), or pass
//! `&group.batch(&ranks)?`, an [`EpBatch`] view that carries the ranks itself (no shared state:
//! usable by two micro-batches at once).
//!
//! **Steps.** Every forward records its layer's logical routing into the group's
//! [`crate::ExpertLoadStats`] and its traffic into the step in progress. `finish_step` closes the
//! step (the traffic becomes [`EpGroup::last_step_traffic`]), and when the [`crate::Rebalancer`]'s
//! period has come, re-plans every layer with EPLB and moves expert weights between ranks before
//! the next step ([`RebalanceReport`]). [`EpGroup::balance`] gives every layer's balance.
//!
//! Invariants:
//! - every placement has the configured shape (`D` ranks, `N` logical experts, `N + R` slots),
//!   so a rebalance never changes how many slots a rank holds;
//! - a rank's bank holds exactly the distinct experts of its slots;
//! - the output of a forward does not depend on `compute_threads` and equals
//!   [`pdserve_model::LocalExperts`]'s within float reassociation (1e-5 in f32, tested);
//! - recorded traffic conserves (token, expert) pairs each way (see [`LayerTraffic`]).
//!
//! # Example
//!
//! ```no_run
//! use candle_core::Device;
//! use pdserve_ep::{EpGroup, EpRuntimeConfig, PlacementConfig};
//! use pdserve_model::{Checkpoint, ContiguousLatentCache, DeepSeekV3, ForwardOptions, SequenceInput};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = pdserve_model::tiny::ensure_default(None)?;
//! let ckpt = Checkpoint::open(&dir)?;
//! let model = DeepSeekV3::from_checkpoint(&ckpt, &Device::Cpu)?;
//! // EP8 with 8 redundant slots: 33 experts per rank.
//! let config = EpRuntimeConfig {
//!     placement: PlacementConfig { num_ranks: 8, num_redundant_experts: 8, ..Default::default() },
//!     ..Default::default()
//! };
//! let mut group = EpGroup::load(&ckpt, config, &Device::Cpu)?;
//! let c = model.config();
//! let mut cache = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu);
//! // Two requests, on DP ranks 0 and 5: their token rows are [0, 0, 5, 5].
//! let batch = [SequenceInput::new(1, vec![0, 7], 0), SequenceInput::new(2, vec![0, 9], 0)];
//! let out = model.forward(&batch, &mut cache, &group.batch(&[0, 0, 5, 5])?, &ForwardOptions::default())?;
//! let rebalanced = group.finish_step()?; // Some(report) when EPLB's period has come
//! let traffic = group.last_step_traffic();
//! println!("{} rows crossed links in layer 1", traffic.layers[0].dispatch.remote_rows());
//! # let _ = (out, rebalanced); Ok(()) }
//! ```

mod config;
mod error;
mod fabric;
mod rank;
mod traffic;
mod transport;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use parking_lot::Mutex;
use pdserve_model::{Checkpoint, ModelError, MoeExperts, Routing};

pub use config::EpRuntimeConfig;
pub use error::EpRuntimeError;
pub use rank::{EpRank, RankLayer, WeightMoves};
pub use traffic::{DispatchMatrix, LayerTraffic, StepTraffic};

use rank::{ExpertShape, load_ranks, rebuild_ranks};
use transport::{TokenRanks, execute, plan_dispatch};

use crate::{Balance, ExpertLoad, ExpertLoadStats, ExpertPlacement, Rebalancer};

/// Balance of one MoE layer's per-rank load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerBalance {
    /// The model layer index.
    pub layer: usize,
    /// Expected per-rank load of the windowed statistics under the current placement (each
    /// expert's load split equally over its replicas): what EPLB optimizes.
    pub windowed: Balance,
    /// Pairs each rank received in the last finished step (exact, from the dispatch).
    pub last_step: Balance,
}

/// What a rebalance did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceReport {
    /// Steps finished when it was applied.
    pub after_steps: u64,
    /// Expert weights copied between ranks.
    pub moves: WeightMoves,
    /// Per-layer expected balance of the windowed load under the old placements.
    pub before: Vec<Balance>,
    /// The same under the new placements.
    pub after: Vec<Balance>,
}

/// Mutable state of the step in progress (behind a mutex: forwards take `&self`).
#[derive(Debug)]
struct StepState {
    token_ranks: Option<Arc<TokenRanks>>,
    stats: ExpertLoadStats,
    current: Vec<LayerTraffic>,
    last: StepTraffic,
    steps: u64,
}

/// An EP group of `D` ranks running a model's routed experts; see the module doc.
#[derive(Debug)]
pub struct EpGroup {
    config: EpRuntimeConfig,
    rebalancer: Rebalancer,
    /// Model layer index of each MoE layer, in model order (the MTP layer last).
    moe_layers: Vec<usize>,
    /// One placement per MoE layer.
    placements: Vec<ExpertPlacement>,
    ranks: Vec<EpRank>,
    shape: ExpertShape,
    top_k: usize,
    device: Device,
    state: Mutex<StepState>,
}

impl EpGroup {
    /// Builds the group for `ckpt`: validates `config` against the checkpoint, plans the initial
    /// placements ([`Rebalancer::initial_placements`]: EPLB on `rebalancer.initial_load_file`
    /// when set, else the placement config's layout) and loads every rank's experts.
    pub fn load(
        ckpt: &Checkpoint,
        config: EpRuntimeConfig,
        device: &Device,
    ) -> Result<Self, EpRuntimeError> {
        let rebalancer = Rebalancer::new(config.placement.clone(), config.rebalancer.clone())?;
        let layers = moe_layers(ckpt)?;
        let placements = rebalancer.initial_placements(layers.len())?;
        Self::build(ckpt, config, rebalancer, layers, placements, device)
    }

    /// Builds the group with explicit per-MoE-layer placements (model order, the MTP layer
    /// last), each of the configured shape.
    pub fn with_placements(
        ckpt: &Checkpoint,
        config: EpRuntimeConfig,
        placements: Vec<ExpertPlacement>,
        device: &Device,
    ) -> Result<Self, EpRuntimeError> {
        let rebalancer = Rebalancer::new(config.placement.clone(), config.rebalancer.clone())?;
        let layers = moe_layers(ckpt)?;
        Self::build(ckpt, config, rebalancer, layers, placements, device)
    }

    fn build(
        ckpt: &Checkpoint,
        config: EpRuntimeConfig,
        rebalancer: Rebalancer,
        moe_layers: Vec<usize>,
        placements: Vec<ExpertPlacement>,
        device: &Device,
    ) -> Result<Self, EpRuntimeError> {
        let model = ckpt.config();
        let moe = model.moe()?;
        if config.placement.num_logical_experts != moe.n_routed_experts {
            return Err(EpRuntimeError::field(
                "placement.num_logical_experts",
                format!(
                    "is {} but the checkpoint has n_routed_experts = {}",
                    config.placement.num_logical_experts, moe.n_routed_experts
                ),
            ));
        }
        let groups = moe.n_group.max(1);
        if config.rebalancer.num_expert_groups != groups {
            return Err(EpRuntimeError::field(
                "rebalancer.num_expert_groups",
                format!(
                    "is {} but the checkpoint routes over n_group = {groups} expert groups",
                    config.rebalancer.num_expert_groups
                ),
            ));
        }
        if config.compute_threads == 0 {
            return Err(EpRuntimeError::field(
                "compute_threads",
                "must be at least 1",
            ));
        }
        check_placements(&config, &placements, moe_layers.len())?;
        let shape = ExpertShape {
            hidden: model.hidden_size,
            inter: moe.expert_intermediate,
        };
        let ranks = load_ranks(ckpt, &placements, &moe_layers, device)?;
        let d = config.placement.num_ranks;
        let row_bytes = (shape.hidden * 4) as u64;
        let stats = rebalancer.new_stats(moe_layers.len())?;
        let fresh: Vec<LayerTraffic> = moe_layers
            .iter()
            .map(|&l| LayerTraffic::new(l, d, moe.top_k, row_bytes))
            .collect();
        let state = StepState {
            token_ranks: None,
            stats,
            current: fresh.clone(),
            last: StepTraffic {
                step: 0,
                layers: fresh,
            },
            steps: 0,
        };
        Ok(Self {
            config,
            rebalancer,
            moe_layers,
            placements,
            ranks,
            shape,
            top_k: moe.top_k,
            device: device.clone(),
            state: Mutex::new(state),
        })
    }

    /// The EP size `D`.
    pub fn ep_size(&self) -> usize {
        self.config.placement.num_ranks
    }

    /// The runtime config.
    pub fn config(&self) -> &EpRuntimeConfig {
        &self.config
    }

    /// The rebalancing policy object.
    pub fn rebalancer(&self) -> &Rebalancer {
        &self.rebalancer
    }

    /// Model layer indices of the MoE layers, in model order (the MTP layer last).
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }

    /// The current placement of every MoE layer (same order as [`Self::moe_layers`]).
    pub fn placements(&self) -> &[ExpertPlacement] {
        &self.placements
    }

    /// The current placement of model layer `layer`.
    pub fn placement(&self, layer: usize) -> Option<&ExpertPlacement> {
        self.moe_index(layer).ok().map(|i| &self.placements[i])
    }

    /// The ranks and the experts each holds.
    pub fn ranks(&self) -> &[EpRank] {
        &self.ranks
    }

    /// Steps finished.
    pub fn steps(&self) -> u64 {
        self.state.lock().steps
    }

    /// The current placements in the fabric's form, one per MoE layer (the `placements` of the
    /// fabric's `StepInput`: main layers, then the MTP layer).
    pub fn fabric_placements(
        &self,
    ) -> Result<Vec<pdserve_fabric::ExpertPlacement>, EpRuntimeError> {
        self.placements
            .iter()
            .map(|p| pdserve_fabric::ExpertPlacement::try_from(p).map_err(EpRuntimeError::from))
            .collect()
    }

    /// Says which DP rank each token row of the next forwards belongs to (`ranks[row] < D`), until
    /// the next call or [`Self::finish_step`]. Rows of one rank keep their relative order: the
    /// `i`-th row of rank `r` is that rank's token `i` for replica choice.
    pub fn set_token_ranks(&self, ranks: &[u32]) -> Result<(), EpRuntimeError> {
        let tokens = TokenRanks::new(ranks, self.ep_size())?;
        self.state.lock().token_ranks = Some(Arc::new(tokens));
        Ok(())
    }

    /// A view of the group that runs forwards for token rows of `ranks` (see
    /// [`Self::set_token_ranks`]), without touching the group's own token context.
    pub fn batch(&self, ranks: &[u32]) -> Result<EpBatch<'_>, EpRuntimeError> {
        Ok(EpBatch {
            group: self,
            tokens: TokenRanks::new(ranks, self.ep_size())?,
        })
    }

    fn moe_index(&self, layer: usize) -> Result<usize, EpRuntimeError> {
        self.moe_layers
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| EpRuntimeError::NotMoeLayer {
                layer,
                moe_layers: self.moe_layers.clone(),
            })
    }

    /// One routed forward of model layer `layer` for token rows from `tokens`.
    fn forward_tokens(
        &self,
        layer: usize,
        hidden: &Tensor,
        routing: &Routing,
        tokens: &TokenRanks,
    ) -> Result<Tensor, EpRuntimeError> {
        let moe = self.moe_index(layer)?;
        let (rows, width) = hidden.dims2()?;
        if width != self.shape.hidden {
            return Err(EpRuntimeError::Input {
                layer,
                reason: format!(
                    "hidden rows are {width} wide, the experts take {}",
                    self.shape.hidden
                ),
            });
        }
        if tokens.len() != rows {
            return Err(EpRuntimeError::TokenRanksMismatch {
                layer,
                ranks: tokens.len(),
                rows,
            });
        }
        if routing.top_k != self.top_k {
            return Err(EpRuntimeError::Input {
                layer,
                reason: format!(
                    "routing has top_k {}, the model {}",
                    routing.top_k, self.top_k
                ),
            });
        }
        let row_bytes = (width * 4) as u64;
        let mut plan = plan_dispatch(layer, &self.placements[moe], routing, tokens, row_bytes)?;
        let source: Vec<f32> = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let banks: Vec<_> = self
            .ranks
            .iter()
            .map(|r| r.bank(moe))
            .collect::<Result<_, _>>()?;
        let combined = execute(
            &mut plan,
            tokens,
            &source,
            width,
            &banks,
            &self.device,
            self.config.compute_threads,
        )?;
        {
            let mut state = self.state.lock();
            state.stats.record(moe, &routing.ids, routing.top_k)?;
            state.current[moe].accumulate(&plan.traffic);
        }
        Ok(Tensor::from_vec(combined, (rows, width), &self.device)?.to_dtype(hidden.dtype())?)
    }

    /// Closes the step: folds its routing into the load statistics, makes its traffic
    /// [`Self::last_step_traffic`], clears the token context, and, when the rebalancer's period
    /// has come and the statistics hold load, re-plans every layer with EPLB and moves the
    /// weights ([`Self::apply_placements`]).
    pub fn finish_step(&mut self) -> Result<Option<RebalanceReport>, EpRuntimeError> {
        let planned = {
            let state = self.state.get_mut();
            state.stats.finish_step();
            let fresh: Vec<LayerTraffic> = state
                .current
                .iter()
                .map(|l| LayerTraffic::new(l.layer, l.tokens_per_rank.len(), l.top_k, l.row_bytes))
                .collect();
            state.last = StepTraffic {
                step: state.steps,
                layers: std::mem::replace(&mut state.current, fresh),
            };
            state.steps += 1;
            state.token_ranks = None;
            self.rebalancer.maybe_rebalance(state.steps, &state.stats)?
        };
        planned.map(|p| self.apply_placements(p)).transpose()
    }

    /// Replaces every layer's placement (same shape as the configured one, one per MoE layer),
    /// moving expert weights between ranks: kept experts stay, new ones are copied from a rank
    /// that held them. All-or-nothing: on error the group is unchanged.
    pub fn apply_placements(
        &mut self,
        placements: Vec<ExpertPlacement>,
    ) -> Result<RebalanceReport, EpRuntimeError> {
        check_placements(&self.config, &placements, self.moe_layers.len())?;
        let (ranks, moves) = rebuild_ranks(
            &self.ranks,
            &self.placements,
            &placements,
            self.shape.bytes(),
        )?;
        let state = self.state.get_mut();
        let load = state.stats.snapshot();
        let before = expected_balances(&self.placements, &load)?;
        let after = expected_balances(&placements, &load)?;
        self.ranks = ranks;
        self.placements = placements;
        Ok(RebalanceReport {
            after_steps: state.steps,
            moves,
            before,
            after,
        })
    }

    /// The traffic of the last finished step, per MoE layer.
    pub fn last_step_traffic(&self) -> StepTraffic {
        self.state.lock().last.clone()
    }

    /// The rank that served each (token, expert) pair of the last finished step, per MoE layer
    /// (model order, the MTP layer last; empty for a layer that did not run): each layer's
    /// [`LayerTraffic::served_ranks`], rows in the order the forwards gave them, without copying
    /// the matrices.
    pub fn last_step_served_ranks(&self) -> Vec<Vec<u32>> {
        let state = self.state.lock();
        state
            .last
            .layers
            .iter()
            .map(|l| l.served_ranks.clone())
            .collect()
    }

    /// The windowed expert load (also the load file's content: [`ExpertLoad::write`]).
    pub fn load_snapshot(&self) -> ExpertLoad {
        self.state.lock().stats.snapshot()
    }

    /// Balance of every MoE layer: windowed-expected under the current placement, and the exact
    /// per-rank pairs of the last finished step.
    pub fn balance(&self) -> Result<Vec<LayerBalance>, EpRuntimeError> {
        let state = self.state.lock();
        let load = state.stats.snapshot();
        let windowed = expected_balances(&self.placements, &load)?;
        Ok(self
            .moe_layers
            .iter()
            .zip(windowed)
            .zip(&state.last.layers)
            .map(|((&layer, windowed), last)| LayerBalance {
                layer,
                windowed,
                last_step: Balance::of_counts(&last.dispatch.received_pairs()),
            })
            .collect())
    }
}

/// Expected per-layer balance of `load` under `placements`.
fn expected_balances(
    placements: &[ExpertPlacement],
    load: &ExpertLoad,
) -> Result<Vec<Balance>, EpRuntimeError> {
    placements
        .iter()
        .zip(load.layers())
        .map(|(p, layer)| Ok(Balance::of(&p.expected_rank_loads(layer)?)))
        .collect()
}

/// The model layer indices with routed experts, main layers then MTP layers.
fn moe_layers(ckpt: &Checkpoint) -> Result<Vec<usize>, EpRuntimeError> {
    let c = ckpt.config();
    let layers: Vec<usize> = (0..c.total_layers())
        .filter(|&l| c.is_moe_layer(l))
        .collect();
    if layers.is_empty() {
        return Err(EpRuntimeError::field(
            "checkpoint",
            format!(
                "{} has no MoE layer to run expert-parallel",
                ckpt.dir().display()
            ),
        ));
    }
    Ok(layers)
}

/// Checks that `placements` has one placement per MoE layer, each of the configured shape.
fn check_placements(
    config: &EpRuntimeConfig,
    placements: &[ExpertPlacement],
    num_moe_layers: usize,
) -> Result<(), EpRuntimeError> {
    if placements.len() != num_moe_layers {
        return Err(EpRuntimeError::field(
            "placements",
            format!(
                "{} placements for {num_moe_layers} MoE layers (the MTP layer included)",
                placements.len()
            ),
        ));
    }
    let want = &config.placement;
    for (i, p) in placements.iter().enumerate() {
        if p.num_ranks() != want.num_ranks
            || p.num_logical_experts() != want.num_logical_experts
            || p.num_physical_experts() != want.num_physical_experts()
        {
            return Err(EpRuntimeError::field(
                format!("placements[{i}]"),
                format!(
                    "has {} ranks, {} logical and {} physical experts; the group is configured \
                     for {}, {} and {}",
                    p.num_ranks(),
                    p.num_logical_experts(),
                    p.num_physical_experts(),
                    want.num_ranks,
                    want.num_logical_experts,
                    want.num_physical_experts()
                ),
            ));
        }
    }
    Ok(())
}

impl MoeExperts for EpGroup {
    /// Runs with the token ranks of the last [`EpGroup::set_token_ranks`].
    fn routed_forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ModelError> {
        let tokens = self
            .state
            .lock()
            .token_ranks
            .clone()
            .ok_or(EpRuntimeError::NoTokenRanks)?;
        Ok(self.forward_tokens(layer, hidden, routing, &tokens)?)
    }
}

/// An [`EpGroup`] bound to the token ranks of one forward; see [`EpGroup::batch`].
#[derive(Debug)]
pub struct EpBatch<'a> {
    group: &'a EpGroup,
    tokens: TokenRanks,
}

impl EpBatch<'_> {
    /// Token rows this view covers.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

impl MoeExperts for EpBatch<'_> {
    fn routed_forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ModelError> {
        Ok(self
            .group
            .forward_tokens(layer, hidden, routing, &self.tokens)?)
    }
}
