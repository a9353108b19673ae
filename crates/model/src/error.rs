//! The crate's one error type.
//!
//! Every variant names what is at fault — the file, the tensor, the `config.json` key — so that an
//! operator can act on the message alone. Bad input never panics: loaders and forwards return these.

use std::path::PathBuf;

/// Errors of configuration parsing, checkpoint loading, the forward pass and sampling.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file (config, index, reference) is not valid JSON or has the wrong structure.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (it carries line and column).
        source: serde_json::Error,
    },
    /// A `config.json` key holds a value pdserve cannot run (missing, inconsistent or unsupported).
    #[error("{path}: key `{key}`: {message}")]
    Config {
        /// The config file (or `<config>` when the config was built in memory).
        path: PathBuf,
        /// The key at fault, dotted for nested keys (`rope_scaling.factor`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A safetensors file is truncated or its header is malformed.
    #[error("{path}: corrupt safetensors file: {message}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the configuration requires is not in any file of the checkpoint.
    #[error("{dir}: tensor `{name}` not found in the checkpoint")]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The checkpoint's name of the tensor.
        name: String,
    },
    /// A tensor's shape disagrees with what `config.json` implies.
    #[error("{path}: tensor `{name}` has shape {actual:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape derived from the config.
        expected: Vec<usize>,
        /// The shape stored in the file.
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype the loader cannot convert.
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The stored dtype.
        dtype: String,
    },
    /// The tokenizer files are missing or invalid, or text could not be encoded or decoded.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A caller passed arguments the model cannot run (bad token id, position gap, empty batch…).
    #[error("invalid input: {0}")]
    Input(String),
    /// A latent cache implementation refused an operation.
    #[error("latent cache: {0}")]
    Cache(String),
    /// An error of the tensor library (a bug in pdserve if it is ever seen, since inputs are
    /// validated before they reach it).
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// An I/O error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration error for `key` of the config at `path`.
    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
