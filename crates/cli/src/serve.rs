//! `pdserve router|prefill|decode --config FILE`: one service per process, the deployment shape.
//!
//! The file is a [`ClusterFile`]: the router reads `[router]` (and `[sim]` for what `/v1/models`
//! reports before any instance answers); an instance reads `[model]`, `[sim]` and its own
//! `[prefill.<id>]` / `[decode.<id>]` section, picked with `--instance` (optional when the file
//! has one section of that role). Flags override the file.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use pdserve_fabric::Phase;

use crate::model_cmd::configure_threads;
use crate::services::{self, ClusterFile};

/// Flags shared by the three commands.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Cluster file (TOML: `[model]`, `[sim]`, `[router]`, `[prefill.<id>]`, `[decode.<id>]`).
    #[arg(long, env = "PDSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Wall seconds per simulated second (0: no pacing); overrides the file.
    #[arg(long, env = "PDSERVE_TIME_SCALE")]
    time_scale: Option<f64>,
    /// Hardware profile (`h800`, `h100`, `gb200-nvl72`, or a TOML path); overrides `[sim]`.
    #[arg(long, env = "PDSERVE_HARDWARE")]
    hardware: Option<String>,
}

impl CommonArgs {
    fn load(&self) -> anyhow::Result<ClusterFile> {
        let mut file = ClusterFile::load_or_default(self.config.as_deref())?;
        if let Some(t) = self.time_scale {
            file.sim.time_scale = Some(t);
        }
        if let Some(h) = &self.hardware {
            file.sim.hardware.clone_from(h);
        }
        Ok(file)
    }
}

/// Arguments of `pdserve router`.
#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Listen address (`host:port`); overrides `[router] listen`.
    #[arg(long, env = "PDSERVE_LISTEN")]
    listen: Option<String>,
    /// Tokenizer directory (`tokenizer.json` + `tokenizer_config.json`); overrides
    /// `[router] tokenizer` (default: `[model] dir`, else the default model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Arguments of `pdserve prefill` and `pdserve decode`.
#[derive(Debug, clap::Args)]
pub struct InstanceArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Which `[prefill.<id>]` / `[decode.<id>]` section to run (optional when there is one).
    #[arg(long, env = "PDSERVE_INSTANCE")]
    instance: Option<String>,
    /// Checkpoint directory; overrides `[model] dir`.
    #[arg(long, env = "PDSERVE_MODEL")]
    model: Option<PathBuf>,
    /// Internal HTTP listen address; overrides the section's `http_listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Decode only: KV receiver listen address; overrides the section's `kv_listen`.
    #[arg(long)]
    kv_listen: Option<String>,
    /// Matmul threads (default: `[model] threads`, else all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs `pdserve router`.
pub fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    services::init_tracing();
    let file = args.common.load()?;
    let mut config = file.router.clone();
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(t) = args.tokenizer {
        config.tokenizer = t;
    } else if config.tokenizer == pdserve_router::RouterConfig::default().tokenizer {
        config.tokenizer = match &file.model.dir {
            Some(dir) => dir.clone(),
            None => services::resolve_model(None)?,
        };
    }
    config.simulation = Some(file.simulation(file.sim.time_scale.unwrap_or(1.0)));
    config.validate().map_err(|e| anyhow!("{e}"))?;
    let rt = services::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding the router to {}", config.listen))?;
        let addr = listener.local_addr()?;
        println!("pdserve router: listening on http://{addr}");
        tracing::info!(
            listen = %addr,
            prefill = config.prefill.len(),
            decode = config.decode.len(),
            tokenizer = %config.tokenizer.display(),
            "router listening on http://{addr}"
        );
        pdserve_router::serve(config, listener, services::shutdown_signal())
            .await
            .map_err(|e| anyhow!("router: {e}"))
    })
}

/// The section of `instance` (or the only one); with no section and no `--instance`, the
/// defaults under `default_id`.
fn pick<T: Clone + Default>(
    sections: &std::collections::BTreeMap<String, T>,
    role: &str,
    instance: Option<&str>,
    default_id: &str,
) -> anyhow::Result<(String, T)> {
    if sections.is_empty() && instance.is_none() {
        return Ok((default_id.to_string(), T::default()));
    }
    match instance {
        Some(id) => sections
            .get_key_value(id)
            .map(|(k, v)| (k.clone(), v.clone()))
            .ok_or_else(|| {
                let known: Vec<&str> = sections.keys().map(String::as_str).collect();
                anyhow!("no [{role}.{id}] section in the config (known: {known:?})")
            }),
        None => {
            let mut it = sections.iter();
            match (it.next(), it.next()) {
                (Some((k, v)), None) => Ok((k.clone(), v.clone())),
                (None, _) => bail!("the config has no [{role}.<id>] section"),
                (Some(_), Some(_)) => {
                    bail!("the config has several [{role}.<id>] sections: pass --instance ID")
                }
            }
        }
    }
}

fn model_dir(file: &ClusterFile, flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    services::resolve_model(flag.or_else(|| file.model.dir.clone()).as_deref())
}

/// Runs `pdserve prefill`.
pub fn run_prefill(args: InstanceArgs) -> anyhow::Result<()> {
    services::init_tracing();
    let file = args.common.load()?;
    let (id, mut config) = pick(
        &file.prefill,
        "prefill",
        args.instance.as_deref(),
        "prefill-0",
    )?;
    config.instance_id = id;
    if let Some(l) = args.listen {
        config.http_listen = l;
    }
    file.apply_time_scale(&mut config.engine);
    services::tiny_engine_defaults(&mut config.engine);
    config
        .validate()
        .map_err(|e| anyhow!("[prefill.{}]: {e}", config.instance_id))?;
    configure_threads(args.threads.or(file.model.threads))?;
    let dir = model_dir(&file, args.model)?;
    let parts = services::build_parts(&dir, &file.sim, &config.engine.scheduler, Phase::Prefill)?;
    let rt = services::runtime()?;
    rt.block_on(async move {
        let listener = config
            .bind()
            .await
            .with_context(|| format!("binding prefill to {}", config.http_listen))?;
        println!(
            "pdserve prefill {}: listening on http://{} (model {}, {} hardware, time_scale {})",
            config.instance_id,
            listener.local_addr()?,
            dir.display(),
            file.sim.hardware,
            config.engine.time_scale
        );
        tracing::info!(
            instance = %config.instance_id,
            listen = %listener.local_addr()?,
            model = %dir.display(),
            hardware = %file.sim.hardware,
            time_scale = config.engine.time_scale,
            "prefill instance listening on http://{}", listener.local_addr()?
        );
        pdserve_worker::serve_prefill(config, parts, listener, services::shutdown_signal())
            .await
            .map_err(|e| anyhow!("prefill: {e}"))
    })
}

/// Runs `pdserve decode`.
pub fn run_decode(args: InstanceArgs) -> anyhow::Result<()> {
    services::init_tracing();
    let file = args.common.load()?;
    let (id, mut config) = pick(&file.decode, "decode", args.instance.as_deref(), "decode-0")?;
    config.instance_id = id;
    if let Some(l) = args.listen {
        config.http_listen = l;
    }
    if let Some(l) = args.kv_listen {
        config.kv_listen = l;
    }
    file.apply_time_scale(&mut config.engine);
    services::tiny_engine_defaults(&mut config.engine);
    config
        .validate()
        .map_err(|e| anyhow!("[decode.{}]: {e}", config.instance_id))?;
    configure_threads(args.threads.or(file.model.threads))?;
    let dir = model_dir(&file, args.model)?;
    let parts = services::build_parts(&dir, &file.sim, &config.engine.scheduler, Phase::Decode)?;
    let rt = services::runtime()?;
    rt.block_on(async move {
        let listeners = config
            .bind()
            .await
            .with_context(|| format!("binding decode to {} / {}", config.http_listen, config.kv_listen))?;
        println!(
            "pdserve decode {}: listening on http://{}, KV on {} (model {}, {} hardware, time_scale {})",
            config.instance_id,
            listeners.http.local_addr()?,
            listeners.kv.local_addr()?,
            dir.display(),
            file.sim.hardware,
            config.engine.time_scale
        );
        tracing::info!(
            instance = %config.instance_id,
            listen = %listeners.http.local_addr()?,
            kv_listen = %listeners.kv.local_addr()?,
            model = %dir.display(),
            hardware = %file.sim.hardware,
            time_scale = config.engine.time_scale,
            "decode instance listening on http://{}", listeners.http.local_addr()?
        );
        pdserve_worker::serve_decode(config, parts, listeners, services::shutdown_signal())
            .await
            .map_err(|e| anyhow!("decode: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn an_instance_is_picked_by_id_or_as_the_only_section() {
        let mut sections = BTreeMap::new();
        sections.insert("d0".to_string(), 1u32);
        assert_eq!(
            pick(&sections, "decode", None, "x").unwrap(),
            ("d0".into(), 1)
        );
        sections.insert("d1".to_string(), 2u32);
        assert_eq!(
            pick(&sections, "decode", Some("d1"), "x").unwrap(),
            ("d1".into(), 2)
        );
        let several = pick(&sections, "decode", None, "x")
            .unwrap_err()
            .to_string();
        assert!(several.contains("--instance"), "{several}");
        let unknown = pick(&sections, "decode", Some("d9"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("[decode.d9]") && unknown.contains("d1"),
            "{unknown}"
        );
        let empty = BTreeMap::<String, u32>::new();
        assert_eq!(
            pick(&empty, "decode", None, "decode-0").unwrap(),
            ("decode-0".into(), 0)
        );
        assert!(pick(&empty, "decode", Some("d0"), "decode-0").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("pdserve-serve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[sim]\nhardware = \"h100\"\ntime_scale = 2.0\n").unwrap();
        let from_file = CommonArgs {
            config: Some(path.clone()),
            time_scale: None,
            hardware: None,
        }
        .load()
        .unwrap();
        assert_eq!(from_file.sim.hardware, "h100");
        assert_eq!(from_file.sim.time_scale, Some(2.0));
        let flagged = CommonArgs {
            config: Some(path),
            time_scale: Some(0.0),
            hardware: Some("gb200-nvl72".into()),
        }
        .load()
        .unwrap();
        assert_eq!(flagged.sim.hardware, "gb200-nvl72");
        assert_eq!(flagged.sim.time_scale, Some(0.0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
