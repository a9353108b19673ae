//! The one error type of this crate.
//!
//! Every variant names what is at fault: a config field (as a dotted path such as
//! `placement.num_redundant_experts`), a layer, an expert id or a file. Nothing in this crate panics
//! on bad input; it returns one of these.

use std::path::PathBuf;

/// Errors from placement, load statistics, EPLB and the rebalancer.
#[derive(Debug, thiserror::Error)]
pub enum EpError {
    /// A field holds a value that cannot be used; `field` is the dotted path of the field.
    #[error("invalid `{field}`: {reason}")]
    InvalidField {
        /// Dotted path of the offending field, e.g. `placement.gpus_per_node`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The physical expert slots do not divide evenly over the EP ranks.
    #[error(
        "`num_logical_experts` ({num_logical_experts}) + `num_redundant_experts` \
         ({num_redundant_experts}) = {} physical slots is not divisible by `num_ranks` ({num_ranks})",
        num_logical_experts + num_redundant_experts
    )]
    SlotsNotDivisible {
        /// Logical routed experts per layer.
        num_logical_experts: usize,
        /// Redundant physical slots per layer.
        num_redundant_experts: usize,
        /// EP ranks (GPUs).
        num_ranks: usize,
    },

    /// A logical expert is placed on no GPU.
    #[error("logical expert {expert} has no physical replica in `{field}`")]
    ExpertWithoutReplica {
        /// Dotted path of the map that lacks it.
        field: String,
        /// The logical expert id.
        expert: usize,
    },

    /// An expert id (in a map or in routing) is out of range.
    #[error("expert id {expert} in `{field}` is out of range (must be < {limit})")]
    ExpertOutOfRange {
        /// Where the id was found.
        field: String,
        /// The offending id.
        expert: usize,
        /// The exclusive upper bound.
        limit: usize,
    },

    /// A layer index is out of range.
    #[error("layer {layer} is out of range ({num_layers} layers)")]
    LayerOutOfRange {
        /// The offending layer index.
        layer: usize,
        /// Number of layers known.
        num_layers: usize,
    },

    /// A flat `[n_tokens × k]` routing slice does not have a length divisible by `k`.
    #[error("routing ids of length {len} are not a [n_tokens × k] matrix with k = {k}")]
    RoutingShape {
        /// Length of the slice.
        len: usize,
        /// Experts per token.
        k: usize,
    },

    /// A load file could not be read or written.
    #[error("expert load file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A load file is not valid JSON of the expected shape.
    #[error("expert load file {}: {source}", path.display())]
    Json {
        /// The file (empty when parsing a string).
        path: PathBuf,
        /// The parse error, with line and column.
        source: serde_json::Error,
    },
}

impl EpError {
    /// Shorthand for [`EpError::InvalidField`].
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
