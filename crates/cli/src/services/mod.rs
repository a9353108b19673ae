//! Building pdserve's services from configuration: the cluster file, the default model, and the
//! engine parts (real model + simulated fabric) of prefill and decode instances.
//!
//! One TOML format serves every command ([`ClusterFile`]): `[model]` (checkpoint), `[sim]` (what
//! the fabric models, and `time_scale` for every instance), `[router]` (the router's
//! `RouterConfig`), `[prefill.<id>]` and `[decode.<id>]` (the worker's `PrefillConfig` /
//! `DecodeConfig`). `pdserve up` reads the first prefill and decode sections (if any) for their
//! engine settings and binds their internal ports on loopback itself.
//!
//! Layering: defaults < TOML < environment (`PDSERVE_*`, through clap) < flags.

pub mod backend;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use pdserve_engine::{
    ClockConfig, ExecutorConfig, FabricStepClock, ModelExecutor, SchedulerConfig,
};
use pdserve_fabric::{Mode, Phase};
use pdserve_model::{Checkpoint, DeepSeekV3, LocalExperts};
use pdserve_protocol::openai::SimMode;
use pdserve_router::RouterConfig;
use pdserve_router::config::SimulationConfig;
use pdserve_worker::{DecodeConfig, EngineConfig, EngineParts, PrefillConfig, SimLabel};
use serde::{Deserialize, Serialize};

use backend::{FabricClock, ModelBackend};

/// The parts of one instance: the model backend and the fabric clock.
pub type Parts = EngineParts<ModelBackend, FabricClock>;

/// The whole file; every section optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterFile {
    /// The checkpoint every instance runs.
    pub model: ModelSection,
    /// What the fabric models.
    pub sim: SimSection,
    /// The router.
    pub router: RouterConfig,
    /// Prefill instances by id.
    pub prefill: BTreeMap<String, PrefillConfig>,
    /// Decode instances by id.
    pub decode: BTreeMap<String, DecodeConfig>,
}

/// `[model]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Checkpoint directory (with `tokenizer.json`); relative paths are relative to the file.
    /// Absent: the default model (see [`resolve_model`]).
    pub dir: Option<PathBuf>,
    /// Matmul threads per process (absent: all cores).
    pub threads: Option<usize>,
}

/// `[sim]`: the modeled cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimSection {
    /// Hardware profile: `h800`, `h100`, `gb200-nvl72`, or a TOML path.
    pub hardware: String,
    /// Modeled model: a built-in shape (`deepseek-v3`) or a `config.json` path.
    pub modeled_model: String,
    /// `detailed` or `analysis`.
    pub mode: Mode,
    /// GPUs of a prefill instance's EP group (each a DP attention rank).
    pub prefill_ep_size: u32,
    /// GPUs of a decode instance's EP group (each a DP attention rank).
    pub decode_ep_size: u32,
    /// Wall seconds per simulated second for every instance (0: no pacing); absent: each
    /// instance's own `engine.time_scale`.
    pub time_scale: Option<f64>,
}

impl Default for SimSection {
    fn default() -> Self {
        Self {
            hardware: "h800".into(),
            modeled_model: "deepseek-v3".into(),
            mode: Mode::Detailed,
            prefill_ep_size: 32,
            decode_ep_size: 144,
            time_scale: None,
        }
    }
}

impl ClusterFile {
    /// Reads `path`; errors name the file and the key at fault. Relative model paths become
    /// relative to the file's directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut file: ClusterFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(dir) = &file.model.dir
            && dir.is_relative()
        {
            file.model.dir = Some(base.join(dir));
        }
        if file.router.tokenizer.is_relative()
            && file.router.tokenizer != RouterConfig::default().tokenizer
        {
            file.router.tokenizer = base.join(&file.router.tokenizer);
        }
        Ok(file)
    }

    /// The file at `path`, or all defaults when `None`.
    pub fn load_or_default(path: Option<&Path>) -> anyhow::Result<Self> {
        path.map_or_else(|| Ok(Self::default()), Self::load)
    }

    /// The time scale every instance runs at: `[sim] time_scale` or else `engine`'s.
    pub fn apply_time_scale(&self, engine: &mut EngineConfig) {
        if let Some(t) = self.sim.time_scale {
            engine.time_scale = t;
        }
    }

    /// What the router reports on `/v1/models` when no instance answers its stats.
    pub fn simulation(&self, time_scale: f64) -> SimulationConfig {
        SimulationConfig {
            hardware: self.sim.hardware.clone(),
            time_scale,
            modeled_model: self.sim.modeled_model.clone(),
            mode: sim_mode(self.sim.mode),
        }
    }
}

fn sim_mode(mode: Mode) -> SimMode {
    match mode {
        Mode::Analysis => SimMode::Analysis,
        Mode::Detailed => SimMode::Detailed,
    }
}

/// Where the default checkpoint is: the trained `models/tiny-v1` when it opens (its config and
/// safetensors headers are valid; looked up in the working directory, then in the repository the
/// binary was built from), else the deterministic tiny model, created on first use in the cache
/// directory. No weight is read here: the instances load them.
pub fn resolve_model(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-v1");
    for candidate in [PathBuf::from("models/tiny-v1"), repo] {
        if !candidate.join("config.json").exists() {
            continue;
        }
        match Checkpoint::open(&candidate) {
            Ok(_) => return Ok(candidate.canonicalize().unwrap_or(candidate)),
            Err(e) => {
                tracing::warn!(dir = %candidate.display(), error = %e, "models/tiny-v1 does not load; trying the next default")
            }
        }
    }
    pdserve_model::tiny::ensure_default(None).context("preparing the deterministic tiny model")
}

/// The model's end-of-sequence ids (config and tokenizer).
fn eos_ids(model_dir: &Path, model: &DeepSeekV3) -> Vec<u32> {
    let mut eos = model.config().eos_ids();
    if let Ok(tok) = pdserve_model::Tokenizer::from_dir(model_dir) {
        eos.extend(tok.eos_id());
    }
    eos.sort_unstable();
    eos.dedup();
    eos
}

/// A checkpoint loaded once: the model, its routed experts and its end-of-sequence ids. The
/// instances built from one [`LoadedModel`] share its weights (tensors are reference-counted and
/// the model runs on `&self`), so `pdserve up` holds one copy for its prefill and decode instances.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    dir: PathBuf,
    model: Arc<DeepSeekV3>,
    experts: LocalExperts,
    eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    /// Loads every weight of the checkpoint in `dir` on the CPU.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let (model, experts) = DeepSeekV3::load(dir, &candle_core::Device::Cpu)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        Ok(Self {
            eos_token_ids: eos_ids(dir, &model),
            dir: dir.to_path_buf(),
            model: Arc::new(model),
            experts,
        })
    }
}

/// Builds the parts of a prefill (`phase = Prefill`) or decode instance, loading the model.
pub fn build_parts(
    model_dir: &Path,
    sim: &SimSection,
    scheduler: &SchedulerConfig,
    phase: Phase,
) -> anyhow::Result<Parts> {
    build_parts_from(&LoadedModel::load(model_dir)?, sim, scheduler, phase)
}

/// Builds the parts of a prefill or decode instance on an already loaded model (its weights are
/// shared, not copied).
pub fn build_parts_from(
    loaded: &LoadedModel,
    sim: &SimSection,
    scheduler: &SchedulerConfig,
    phase: Phase,
) -> anyhow::Result<Parts> {
    let ep_size = match phase {
        Phase::Prefill => sim.prefill_ep_size,
        Phase::Decode => sim.decode_ep_size,
    };
    let clock = FabricStepClock::new(ClockConfig {
        hardware: sim.hardware.clone(),
        model: sim.modeled_model.clone(),
        mode: sim.mode,
        phase,
        ep_size,
        ..ClockConfig::default()
    })
    .map_err(|e| anyhow!("[sim]: {e}"))?;
    let exec = ModelExecutor::new(
        loaded.model.clone(),
        loaded.experts.clone(),
        ExecutorConfig::for_scheduler(scheduler, ep_size),
    )
    .with_context(|| format!("building the executor of {}", loaded.dir.display()))?;
    clock
        .check_real_model(exec.model().config().n_routed_experts.unwrap_or(0))
        .map_err(|e| anyhow!("[sim] modeled_model: {e}"))?;
    let mtp = scheduler.spec_tokens > 0;
    let label = SimLabel {
        hardware: sim.hardware.clone(),
        modeled_model: sim.modeled_model.clone(),
        mode: sim_mode(sim.mode),
    };
    let eos_token_ids = loaded.eos_token_ids.clone();
    Ok(EngineParts {
        executor: ModelBackend::new(exec, eos_token_ids.clone()),
        clock: FabricClock::new(clock, mtp),
        eos_token_ids,
        sim: Some(label),
    })
}

/// Defaults of the engine for the tiny models: a small KV pool and their context length.
pub fn tiny_engine_defaults(engine: &mut EngineConfig) {
    let defaults = SchedulerConfig::default();
    if engine.scheduler.num_kv_blocks == defaults.num_kv_blocks {
        engine.scheduler.num_kv_blocks = 256;
    }
    if engine.scheduler.max_context_tokens == defaults.max_context_tokens {
        engine.scheduler.max_context_tokens = 4096;
    }
}

/// Installs the log subscriber (`RUST_LOG`, default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// A multi-threaded runtime (built after the thread environment is set).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PDSERVE_TOML: &str = include_str!("../../../../config/pdserve.toml");
    const CLUSTER_TOML: &str = include_str!("../../../../config/cluster-local.toml");

    #[test]
    fn pdserve_toml_states_the_defaults_of_up() {
        let file: ClusterFile = toml::from_str(PDSERVE_TOML).unwrap();
        let d = SimSection::default();
        assert_eq!(file.sim.hardware, d.hardware);
        assert_eq!(file.sim.modeled_model, d.modeled_model);
        assert_eq!(file.sim.mode, d.mode);
        assert_eq!(file.sim.prefill_ep_size, d.prefill_ep_size);
        assert_eq!(file.sim.decode_ep_size, d.decode_ep_size);
        assert_eq!(file.sim.time_scale, Some(1.0));
        assert_eq!(file.router.model, RouterConfig::default().model);
        let mut engine = EngineConfig::default();
        tiny_engine_defaults(&mut engine);
        let prefill = &file.prefill["prefill-0"].engine.scheduler;
        assert_eq!(prefill.num_kv_blocks, engine.scheduler.num_kv_blocks);
        assert_eq!(
            prefill.max_context_tokens,
            engine.scheduler.max_context_tokens
        );
    }

    #[test]
    fn cluster_local_describes_two_prefill_and_two_decode_instances_the_router_knows() {
        let file: ClusterFile = toml::from_str(CLUSTER_TOML).unwrap();
        assert_eq!(file.prefill.len(), 2);
        assert_eq!(file.decode.len(), 2);
        let router = file.router.clone();
        router.validate().unwrap();
        for inst in &router.prefill {
            let section = &file.prefill[&inst.id];
            assert_eq!(inst.url, format!("http://{}", section.http_listen));
            section.validate().unwrap();
        }
        for inst in &router.decode {
            let section = &file.decode[&inst.id];
            assert_eq!(inst.url, format!("http://{}", section.http_listen));
            assert_eq!(inst.kv_addr.as_deref(), Some(section.kv_listen.as_str()));
            section.validate().unwrap();
        }
    }

    #[test]
    fn unknown_keys_in_the_cluster_file_are_rejected_with_their_name() {
        let err = toml::from_str::<ClusterFile>("[sim]\nhardwar = \"h800\"\n").unwrap_err();
        assert!(err.to_string().contains("hardwar"), "{err}");
    }

    #[test]
    fn sim_time_scale_overrides_each_instance_and_absence_keeps_theirs() {
        let mut file = ClusterFile::default();
        let mut engine = EngineConfig {
            time_scale: 2.0,
            ..EngineConfig::default()
        };
        file.apply_time_scale(&mut engine);
        assert_eq!(engine.time_scale, 2.0);
        file.sim.time_scale = Some(0.0);
        file.apply_time_scale(&mut engine);
        assert_eq!(engine.time_scale, 0.0);
    }
}
