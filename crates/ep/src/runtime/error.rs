//! The error type of the EP runtime.
//!
//! Each variant names what is at fault: a config field (dotted path), a layer, a token row, a rank.
//! Errors of the layers below (placement, model, tensors, fabric) are wrapped unchanged. Inside
//! [`pdserve_model::MoeExperts::routed_forward`], whose signature the model crate fixes, an
//! [`EpRuntimeError`] becomes a [`pdserve_model::ModelError`]: model and tensor errors pass through
//! as themselves, everything else becomes `ModelError::Input` with this error's message.

use pdserve_fabric::FabricError;
use pdserve_model::ModelError;

use crate::EpError;

/// Errors from building, running and rebalancing an EP group.
#[derive(Debug, thiserror::Error)]
pub enum EpRuntimeError {
    /// A runtime config field cannot be used with this checkpoint or group.
    #[error("invalid `{field}`: {reason}")]
    InvalidField {
        /// Dotted path of the field, e.g. `ep.placement.num_logical_experts`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A forward was asked for a layer that has no routed experts.
    #[error("layer {layer} is not an MoE layer of this model (MoE layers: {moe_layers:?})")]
    NotMoeLayer {
        /// The model layer index passed in.
        layer: usize,
        /// The model's MoE layer indices.
        moe_layers: Vec<usize>,
    },

    /// No token → source-rank assignment was set before a forward.
    #[error(
        "no token ranks were set for this forward: call `EpGroup::set_token_ranks` (or use \
         `EpGroup::batch`) before running the model"
    )]
    NoTokenRanks,

    /// The token → rank assignment does not match the forward's rows.
    #[error(
        "layer {layer}: the token ranks cover {ranks} rows but the forward has {rows} hidden rows \
         (set the ranks of exactly the rows of each forward, MTP forwards included)"
    )]
    TokenRanksMismatch {
        /// The model layer index.
        layer: usize,
        /// Rows in the token → rank assignment.
        ranks: usize,
        /// Rows of `hidden`.
        rows: usize,
    },

    /// A token row names a rank outside the group.
    #[error("token row {row} belongs to rank {rank}, but the EP group has {num_ranks} ranks")]
    RankOutOfRange {
        /// The token row.
        row: usize,
        /// The rank given for it.
        rank: u32,
        /// Ranks in the group.
        num_ranks: usize,
    },

    /// The routing or hidden states handed to a forward are malformed.
    #[error("layer {layer}: {reason}")]
    Input {
        /// The model layer index.
        layer: usize,
        /// What is wrong.
        reason: String,
    },

    /// Placement, statistics or EPLB.
    #[error(transparent)]
    Ep(#[from] EpError),

    /// Checkpoint loading or expert execution in the model crate.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// A tensor operation.
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),

    /// Converting a placement or routing into the fabric's types.
    #[error(transparent)]
    Fabric(#[from] FabricError),
}

impl EpRuntimeError {
    /// Shorthand for [`EpRuntimeError::InvalidField`].
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<EpRuntimeError> for ModelError {
    fn from(err: EpRuntimeError) -> Self {
        match err {
            EpRuntimeError::Model(e) => e,
            EpRuntimeError::Candle(e) => ModelError::Candle(e),
            other => ModelError::Input(other.to_string()),
        }
    }
}
