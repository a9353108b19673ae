//! The decode benchmark behind `pdserve bench decode`: the engine on a real model at a configured
//! operating point, priced on the simulated fabric.
//!
//! A [`DecodeBenchConfig`] (TOML, `config/bench/*.toml`, `config/paper-*.toml`) names the operating
//! point: the modeled cluster (`[fabric]`, a [`ClockConfig`]: hardware, modeled shape, mode, EP
//! size), the load (`[workload]`: requests per GPU, prompt length, temperature) and the engine's
//! knobs (`[engine]`: TBO, MTP, draft mode, time scale), and optionally the expert-parallel runtime
//! (`[ep]`; absent: local experts). [`run_decode_bench`] admits
//! `ep_size × requests_per_gpu` requests, prefills their prompts (not measured), then runs
//! `steps` decode steps through a [`StepDriver`](crate::StepDriver) and returns a
//! [`DecodeBenchReport`]: simulated step time and TPOT, simulated tokens/s per user, GPU and node,
//! real wall time per step, the pacing lag, and MTP acceptance.
//!
//! Time is an input: the caller passes the monotonic clock and the sleep ([`BenchTime`]), so the
//! library reads no clock; the CLI passes `Instant` and `thread::sleep`.

mod run;

use std::path::{Path, PathBuf};

use pdserve_ep::EpRuntimeConfig;
use serde::{Deserialize, Serialize};

use crate::clock::{ClockConfig, ClockError};
use crate::model_exec::{DraftMode, ExecError};
use crate::pacing::PacerError;
use crate::state::{AdmitError, StepError};

pub use run::{BenchTime, DecodeBenchReport, run_decode_bench};

/// The operating point of a decode benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeBenchConfig {
    /// One line describing the operating point (printed with the results).
    #[serde(default)]
    pub description: String,
    /// Decode steps measured (after the prompts are prefilled).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Seed of the prompts and of the requests' samplers.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint directory of the real model, relative to the config file's directory when
    /// relative; absent: the embedded deterministic tiny model.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// The load.
    pub workload: WorkloadConfig,
    /// The engine's knobs.
    #[serde(default)]
    pub engine: EngineKnobs,
    /// The modeled cluster that prices each step.
    pub fabric: ClockConfig,
    /// Run the routed experts on the expert-parallel runtime (`D` ranks exchanging real hidden
    /// rows, EPLB) with this configuration; absent: every expert local. Its
    /// `placement.num_ranks` is set from `fabric.ep_size`; its placement prices the steps.
    #[serde(default)]
    pub ep: Option<EpRuntimeConfig>,
}

fn default_steps() -> usize {
    16
}

/// The requests of a benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Concurrent requests per GPU of the EP group (64 = two micro-batches of 32 tokens, the
    /// paper's operating point); the total is `fabric.ep_size × requests_per_gpu`.
    pub requests_per_gpu: u32,
    /// Prompt tokens per request: its context when decoding starts.
    pub prompt_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            requests_per_gpu: 8,
            prompt_tokens: 64,
            temperature: 0.0,
        }
    }
}

/// The engine's knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineKnobs {
    /// Two-micro-batch overlap: split each step into two micro-batches of balanced work.
    pub tbo: bool,
    /// MTP speculative decoding: draft one token per step with the MTP module, verify it next step.
    pub mtp: bool,
    /// How drafts are chosen (`greedy` or `sample`).
    pub draft: DraftMode,
    /// With TBO on, run each micro-batch as its own forward.
    pub split_micro_batches: bool,
    /// Pacing: a step's tokens are released no earlier than its start plus the simulated duration
    /// times this (0 = no pacing).
    pub time_scale: f64,
}

impl Default for EngineKnobs {
    fn default() -> Self {
        Self {
            tbo: true,
            mtp: false,
            draft: DraftMode::Greedy,
            split_micro_batches: true,
            time_scale: 1.0,
        }
    }
}

/// Errors of the benchmark; each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file does not parse (the message names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is unusable; names the field.
    #[error("bench config: `{field}` {problem}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The model or the executor failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The fabric clock failed.
    #[error(transparent)]
    Clock(#[from] ClockError),
    /// The scheduler refused the configuration.
    #[error(transparent)]
    Scheduler(#[from] crate::config::ConfigError),
    /// A request was refused.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// The step protocol failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// A step failed: the executor's error, or `clock: …` when the fabric could not price it.
    #[error("a step failed: {0}")]
    StepFailed(String),
    /// The pacer refused the time scale.
    #[error(transparent)]
    Pacer(#[from] PacerError),
    /// The model could not be loaded or materialized.
    #[error(transparent)]
    Model(#[from] pdserve_model::ModelError),
}

impl DecodeBenchConfig {
    /// Parses a config; `path` names it in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, BenchError> {
        let config: Self = toml::from_str(text).map_err(|e| BenchError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file; a relative `model_dir` is resolved against the file's
    /// directory.
    pub fn load(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text, path)?;
        if let Some(dir) = config.model_dir.as_mut()
            && dir.is_relative()
        {
            *dir = path.parent().unwrap_or(Path::new(".")).join(&*dir);
        }
        Ok(config)
    }

    /// Total concurrent requests.
    pub fn num_requests(&self) -> usize {
        self.fabric.ep_size as usize * self.workload.requests_per_gpu as usize
    }

    /// Checks the values the engine and fabric do not check themselves.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |field, problem: String| Err(BenchError::Invalid { field, problem });
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if self.workload.requests_per_gpu == 0 {
            return bad("workload.requests_per_gpu", "must be at least 1".into());
        }
        if self.workload.prompt_tokens == 0 {
            return bad("workload.prompt_tokens", "must be at least 1".into());
        }
        if !(self.workload.temperature.is_finite() && self.workload.temperature >= 0.0) {
            return bad(
                "workload.temperature",
                format!("must be >= 0, got {}", self.workload.temperature),
            );
        }
        if self.fabric.ep_size == 0 {
            return bad("fabric.ep_size", "must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut files = vec![
            root.join("paper-h800.toml"),
            root.join("paper-gb200-nvl72.toml"),
        ];
        for entry in std::fs::read_dir(root.join("bench")).unwrap() {
            files.push(entry.unwrap().path());
        }
        for f in files {
            let c = DecodeBenchConfig::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if let Some(dir) = c.model_dir {
                assert!(
                    dir.join("config.json").exists(),
                    "{}: {}",
                    f.display(),
                    dir.display()
                );
            }
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let base = "[workload]\nrequests_per_gpu = 2\n[fabric]\nep_size = 4\n";
        let p = Path::new("x.toml");
        let c = DecodeBenchConfig::from_toml_str(base, p).unwrap();
        assert_eq!((c.num_requests(), c.steps, c.engine.tbo), (8, 16, true));
        let e = DecodeBenchConfig::from_toml_str(&format!("{base}colour = 1\n"), p).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = DecodeBenchConfig::from_toml_str(&format!("steps = 0\n{base}"), p).unwrap_err();
        assert!(e.to_string().contains("`steps`"), "{e}");
        let e = DecodeBenchConfig::from_toml_str(
            "[workload]\nrequests_per_gpu = 0\n[fabric]\nep_size = 4\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("requests_per_gpu"), "{e}");
    }
}
