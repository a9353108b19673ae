//! The crate's one error type.
//!
//! Every variant names what is at fault: the file or origin, and the field (a dotted path such as
//! `scale_out.effective_bytes_per_s` or `placement.replicas[17]`). Bad input is always an error,
//! never a panic.

use std::path::PathBuf;

/// Errors of the simulated fabric.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A profile or model name that is neither built in nor a readable file.
    #[error("unknown {kind} `{name}`: expected one of {known}, or a path to a file")]
    UnknownName {
        /// What was looked up ("hardware profile", "model shape", "step config").
        kind: &'static str,
        /// The name given.
        name: String,
        /// The built-in names, comma separated.
        known: String,
    },
    /// A file that could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document that does not parse (syntax, unknown field, wrong type).
    #[error("{origin}: {message}")]
    Parse {
        /// The file or built-in name.
        origin: String,
        /// The parser's message, which names the key at fault.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{origin}: `{field}` {problem}")]
    Invalid {
        /// The file, built-in name, or input structure ("placement", "batch", "routing").
        origin: String,
        /// The dotted path of the field at fault.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A link asked to move to a time before its present.
    #[error("time went backwards on {what}: asked for {asked_us} µs, already at {now_us} µs")]
    TimeWentBackwards {
        /// The object whose clock was asked to go back.
        what: &'static str,
        /// The time asked for.
        asked_us: f64,
        /// The object's present time.
        now_us: f64,
    },
}

impl FabricError {
    /// Shorthand for [`FabricError::Invalid`].
    pub fn invalid(
        origin: impl Into<String>,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            origin: origin.into(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Checks that a rate or size is finite and strictly positive.
pub(crate) fn require_positive(origin: &str, field: &str, value: f64) -> Result<(), FabricError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(FabricError::invalid(
            origin,
            field,
            format!("must be a positive number, got {value}"),
        ))
    }
}

/// Checks that a duration or factor is finite and not negative.
pub(crate) fn require_non_negative(
    origin: &str,
    field: &str,
    value: f64,
) -> Result<(), FabricError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(FabricError::invalid(
            origin,
            field,
            format!("must be zero or positive, got {value}"),
        ))
    }
}
