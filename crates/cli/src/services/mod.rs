//! Building pdserve's services from configuration: the cluster file, the default model, and the
//! engine parts (real model + simulated fabric) of prefill and decode instances.
//!
//! One TOML format serves every command ([`ClusterFile`]): `[model]` (checkpoint), `[sim]` (what
//! the fabric models, and `time_scale` for every instance), `[router]` (the router's
//! `RouterConfig`), `[prefill.<id>]` and `[decode.<id>]` (the worker's `PrefillConfig` /
//! `DecodeConfig`). `pdserve up` reads the first prefill and decode sections (if any) for their
//! engine settings and binds their internal ports on loopback itself.
//!
//! Routed experts: by default every instance runs them in its own process ([`LocalExperts`]);
//! `[sim.prefill_ep_runtime]` / `[sim.decode_ep_runtime]` (the EP runtime's
//! [`EpRuntimeConfig`], the same type as `pdserve bench decode`'s `[ep]`) make that phase's
//! instances EP groups of `prefill_ep_size` / `decode_ep_size` ranks instead
//! ([`experts::ServiceExperts`]): rows reach a rank's experts only through the EP transport, the
//! placement (redundant experts, EPLB from the load file and on its period) is the runtime's, and
//! the fabric clock prices each step with the placement and replicas it really ran with.
//!
//! Layering: defaults < TOML < environment (`PDSERVE_*`, through clap) < flags.

pub mod backend;
pub mod experts;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use pdserve_engine::{
    ClockConfig, ExecutorConfig, FabricStepClock, ModelExecutor, SchedulerConfig,
};
use pdserve_ep::{EpGroup, EpRuntimeConfig};
use pdserve_fabric::{Mode, Phase};
use pdserve_model::{Checkpoint, DeepSeekV3, LocalExperts};
use pdserve_protocol::openai::SimMode;
use pdserve_router::RouterConfig;
use pdserve_router::config::SimulationConfig;
use pdserve_worker::{DecodeConfig, EngineConfig, EngineParts, PrefillConfig, SimLabel};
use serde::{Deserialize, Serialize};

use backend::{FabricClock, ModelBackend};
use experts::ServiceExperts;

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
    /// Run prefill instances' routed experts on the EP runtime with this configuration (its
    /// `placement.num_ranks` is `prefill_ep_size`, and may not be set); absent: every expert
    /// local.
    #[serde(deserialize_with = "ep_runtime_section")]
    pub prefill_ep_runtime: Option<EpRuntimeConfig>,
    /// The same for decode instances (`placement.num_ranks` is `decode_ep_size`).
    #[serde(deserialize_with = "ep_runtime_section")]
    pub decode_ep_runtime: Option<EpRuntimeConfig>,
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
            prefill_ep_runtime: None,
            decode_ep_runtime: None,
        }
    }
}

impl SimSection {
    /// The EP group size of `phase`'s instances.
    pub fn ep_size(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Prefill => self.prefill_ep_size,
            Phase::Decode => self.decode_ep_size,
        }
    }

    /// The EP runtime of `phase`'s instances, `None` for local experts; its
    /// `placement.num_ranks` is the phase's EP size.
    pub fn ep_runtime(&self, phase: Phase) -> Option<EpRuntimeConfig> {
        let section = match phase {
            Phase::Prefill => &self.prefill_ep_runtime,
            Phase::Decode => &self.decode_ep_runtime,
        };
        let mut ep = section.clone()?;
        ep.placement.num_ranks = self.ep_size(phase) as usize;
        Some(ep)
    }
}

/// An `ep_runtime` section of `[sim]`: an [`EpRuntimeConfig`] whose `placement.num_ranks` is left
/// out (the EP group's ranks are the phase's GPUs, `prefill_ep_size` / `decode_ep_size`).
fn ep_runtime_section<'de, D>(d: D) -> Result<Option<EpRuntimeConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let Some(section) = Option::<toml::Table>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = section.get("placement").and_then(|p| p.get("num_ranks")) {
        return Err(D::Error::custom(format!(
            "placement.num_ranks = {n}: the EP group's ranks are its GPUs, set by \
             prefill_ep_size / decode_ep_size (leave num_ranks out)"
        )));
    }
    EpRuntimeConfig::deserialize(toml::Value::Table(section))
        .map(Some)
        .map_err(D::Error::custom)
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
        for ep in [
            &mut file.sim.prefill_ep_runtime,
            &mut file.sim.decode_ep_runtime,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(load) = &mut ep.rebalancer.initial_load_file
                && load.is_relative()
            {
                *load = base.join(&*load);
            }
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

/// A checkpoint loaded once: the model without its routed experts, the opened checkpoint (each
/// EP group loads its ranks' experts from it), the local routed experts once an instance asks for
/// them, and the end-of-sequence ids. The instances built from one [`LoadedModel`] share its
/// weights (tensors are reference-counted and the model runs on `&self`), so `pdserve up` holds
/// one copy for its prefill and decode instances.
#[derive(Debug)]
pub struct LoadedModel {
    dir: PathBuf,
    ckpt: Checkpoint,
    model: Arc<DeepSeekV3>,
    local: std::sync::OnceLock<LocalExperts>,
    eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    /// Loads the checkpoint in `dir` on the CPU (all but the routed experts, which the instances
    /// load: locally or on their EP ranks).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let load = || -> Result<_, pdserve_model::ModelError> {
            let ckpt = Checkpoint::open(dir)?;
            let model = DeepSeekV3::from_checkpoint(&ckpt, &candle_core::Device::Cpu)?;
            Ok((ckpt, model))
        };
        let (ckpt, model) =
            load().with_context(|| format!("loading the model in {}", dir.display()))?;
        Ok(Self {
            eos_token_ids: eos_ids(dir, &model),
            dir: dir.to_path_buf(),
            ckpt,
            model: Arc::new(model),
            local: std::sync::OnceLock::new(),
        })
    }

    /// Every routed expert in this process (loaded on first use, then shared).
    fn local_experts(&self) -> anyhow::Result<LocalExperts> {
        if let Some(x) = self.local.get() {
            return Ok(x.clone());
        }
        let x = LocalExperts::load(&self.ckpt, &candle_core::Device::Cpu)
            .with_context(|| format!("loading the routed experts of {}", self.dir.display()))?;
        Ok(self.local.get_or_init(|| x).clone())
    }

    /// The routed experts of an instance: an EP group with `ep`, else the local experts.
    fn experts(&self, ep: Option<EpRuntimeConfig>, what: &str) -> anyhow::Result<ServiceExperts> {
        Ok(match ep {
            None => ServiceExperts::Local(self.local_experts()?),
            Some(ep) => ServiceExperts::Ep(Box::new(
                EpGroup::load(&self.ckpt, ep, &candle_core::Device::Cpu).map_err(|e| {
                    anyhow!(
                        "[sim.{what}] with the checkpoint in {}: {e}",
                        self.dir.display()
                    )
                })?,
            )),
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
    let ep_size = sim.ep_size(phase);
    let ep = sim.ep_runtime(phase);
    let what = match phase {
        Phase::Prefill => "prefill_ep_runtime",
        Phase::Decode => "decode_ep_runtime",
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
        loaded.experts(ep, what)?,
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

/// Where the routed experts of an instance run, in words (`pdserve up`'s banner).
pub fn describe_experts(parts: &Parts) -> String {
    match parts.executor.executor().experts().ep_group() {
        None => "local (one process)".into(),
        Some(group) => {
            let c = group.config();
            let period = match c.rebalancer.period_steps {
                0 => "never".to_string(),
                n => format!("every {n} steps"),
            };
            format!(
                "EP runtime: {} ranks, {} redundant experts, EPLB {period}{}",
                group.ep_size(),
                c.placement.num_redundant_experts,
                if c.rebalancer.initial_load_file.is_some() {
                    ", initial placement from the load file"
                } else {
                    ""
                }
            )
        }
    }
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
    fn ep_runtime_takes_its_ranks_from_the_phase_ep_size_and_refuses_its_own() {
        let sim: SimSection = toml::from_str(
            "decode_ep_size = 16\n[decode_ep_runtime.placement]\nnum_redundant_experts = 16\n",
        )
        .unwrap();
        assert!(sim.ep_runtime(Phase::Prefill).is_none(), "local by default");
        let ep = sim.ep_runtime(Phase::Decode).unwrap();
        assert_eq!(ep.ep_size(), 16);
        assert_eq!(ep.placement.num_redundant_experts, 16);
        // Any explicit num_ranks is refused, the placement default (8) and the EP size included.
        for n in [8, 16, 32] {
            let err = toml::from_str::<SimSection>(&format!(
                "decode_ep_size = 16\n[decode_ep_runtime.placement]\nnum_ranks = {n}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("num_ranks = {n}")) && err.contains("decode_ep_size"),
                "{err}"
            );
        }
        // Other keys are still checked.
        let err = toml::from_str::<SimSection>("[prefill_ep_runtime.placement]\nranks = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ranks"), "{err}");
    }

    #[test]
    fn a_relative_ep_load_file_is_relative_to_the_cluster_file() {
        let dir = std::env::temp_dir().join(format!("pdserve-ep-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(
            &path,
            "[sim.prefill_ep_runtime.rebalancer]\ninitial_load_file = \"loads/p.json\"\n",
        )
        .unwrap();
        let file = ClusterFile::load(&path).unwrap();
        let ep = file.sim.prefill_ep_runtime.unwrap();
        assert_eq!(
            ep.rebalancer.initial_load_file,
            Some(dir.join("loads/p.json"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_commented_ep_example_of_pdserve_toml_parses_and_turns_the_runtime_on() {
        // The example lines start with `# ` directly after the marker line.
        let start = PDSERVE_TOML
            .find("# EP runtime example")
            .expect("pdserve.toml documents the EP runtime");
        let example: String = PDSERVE_TOML[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        let file: ClusterFile = toml::from_str(&example).unwrap();
        let ep = file.sim.ep_runtime(Phase::Decode).unwrap();
        assert_eq!(ep.ep_size(), file.sim.decode_ep_size as usize);
        assert!(file.sim.ep_runtime(Phase::Prefill).is_some());
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
