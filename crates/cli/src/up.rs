//! `pdserve up`: the router, one prefill and one decode instance in one process, on loopback.
//!
//! The router listens on `--host:--port` (default `127.0.0.1:8000`); the instances' internal HTTP
//! and KV ports are bound on `127.0.0.1:0` and handed to the router. The first line on stdout is
//! `pdserve up: listening on http://ADDR` (with the bound port, so `--port 0` can be discovered).
//! Ctrl-C (or SIGTERM) stops the router first (in-flight requests finish), then the instances.
//!
//! `GET /metrics` on the router is the one scrape target: the router's metrics followed by the
//! prefill and decode instances' (merged per family; every instance series carries
//! `instance="prefill-0"` or `instance="decode-0"`, see docs/metrics.md).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use pdserve_fabric::{Mode, Phase};
use pdserve_router::metrics::MetricsSource;
use pdserve_router::{AppState, InstanceConfig};
use pdserve_worker::{DecodeConfig, DecodeListeners, DecodeService, PrefillConfig, PrefillService};
use tokio::sync::watch;

use crate::model_cmd::configure_threads;
use crate::services::{self, ClusterFile};

/// Arguments of `pdserve up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port of the OpenAI endpoint (0: any free port, printed on stdout).
    #[arg(long, env = "PDSERVE_PORT", default_value_t = 8000)]
    port: u16,
    /// Address the OpenAI endpoint binds.
    #[arg(long, env = "PDSERVE_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Checkpoint directory (default: `[model] dir`, else models/tiny-v1, else the deterministic
    /// tiny model created in the cache directory).
    #[arg(long, env = "PDSERVE_MODEL")]
    model: Option<PathBuf>,
    /// Config file (same format as config/cluster-local.toml; see config/pdserve.toml). The first
    /// `[prefill.<id>]` and `[decode.<id>]` sections give the instances' engine settings; their
    /// listen addresses are replaced by free loopback ports.
    #[arg(long, env = "PDSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Wall seconds per simulated second (0: no pacing; default 1).
    #[arg(long, env = "PDSERVE_TIME_SCALE")]
    time_scale: Option<f64>,
    /// Hardware profile the fabric models (`h800`, `h100`, `gb200-nvl72`, or a TOML path).
    #[arg(long, env = "PDSERVE_HARDWARE")]
    hardware: Option<String>,
    /// Modeled model shape (`deepseek-v3`, or a `config.json` path).
    #[arg(long)]
    modeled_model: Option<String>,
    /// Fabric mode: `detailed` or `analysis`.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<Mode>,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// MTP speculative decoding (`true`: one draft token per decode step) on both instances;
    /// absent: each section's `engine.scheduler.spec_tokens`.
    #[arg(long)]
    mtp: Option<bool>,
}

/// `pdserve up`'s defaults: config/pdserve.toml, compiled in (so `pdserve up --config
/// config/pdserve.toml` runs exactly what `pdserve up` runs).
const UP_DEFAULTS_TOML: &str = include_str!("../../../config/pdserve.toml");

fn up_defaults() -> anyhow::Result<ClusterFile> {
    toml::from_str(UP_DEFAULTS_TOML).context("parsing the built-in defaults (config/pdserve.toml)")
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "detailed" => Ok(Mode::Detailed),
        "analysis" => Ok(Mode::Analysis),
        other => Err(format!("`{other}` is not a mode (detailed, analysis)")),
    }
}

/// Runs `pdserve up`.
pub fn run(args: Args) -> anyhow::Result<()> {
    services::init_tracing();
    let mut file = match args.config.as_deref() {
        Some(path) => ClusterFile::load(path)?,
        None => up_defaults()?,
    };
    if let Some(h) = args.hardware {
        file.sim.hardware = h;
    }
    if let Some(m) = args.modeled_model {
        file.sim.modeled_model = m;
    }
    if let Some(m) = args.mode {
        file.sim.mode = m;
    }
    let time_scale = args.time_scale.or(file.sim.time_scale).unwrap_or(1.0);
    file.sim.time_scale = Some(time_scale);

    let mut prefill = file.prefill.values().next().cloned().unwrap_or_default();
    prefill.instance_id = "prefill-0".into();
    prefill.http_listen = "127.0.0.1:0".into();
    let mut decode = file.decode.values().next().cloned().unwrap_or_default();
    decode.instance_id = "decode-0".into();
    decode.http_listen = "127.0.0.1:0".into();
    decode.kv_listen = "127.0.0.1:0".into();
    decode.kv_advertise = None;
    for engine in [&mut prefill.engine, &mut decode.engine] {
        file.apply_time_scale(engine);
        services::tiny_engine_defaults(engine);
        if let Some(mtp) = args.mtp {
            engine.scheduler.spec_tokens = usize::from(mtp);
        }
    }
    prefill.validate().map_err(|e| anyhow!("[prefill]: {e}"))?;
    decode.validate().map_err(|e| anyhow!("[decode]: {e}"))?;

    let threads = configure_threads(args.threads.or(file.model.threads))?;
    let dir = services::resolve_model(args.model.or_else(|| file.model.dir.clone()).as_deref())?;
    // One copy of the weights, shared by both instances.
    let model = services::LoadedModel::load(&dir)?;
    let prefill_parts =
        services::build_parts_from(&model, &file.sim, &prefill.engine.scheduler, Phase::Prefill)?;
    let decode_parts =
        services::build_parts_from(&model, &file.sim, &decode.engine.scheduler, Phase::Decode)?;
    drop(model);
    let mut router = file.router.clone();
    router.listen = format!("{}:{}", args.host, args.port);
    if router.tokenizer == pdserve_router::RouterConfig::default().tokenizer {
        router.tokenizer.clone_from(&dir);
    }
    router.simulation = Some(file.simulation(time_scale));

    let rt = services::runtime()?;
    rt.block_on(serve_all(UpPlan {
        file,
        dir,
        threads,
        prefill,
        decode,
        router,
        prefill_parts,
        decode_parts,
    }))
}

struct UpPlan {
    file: ClusterFile,
    dir: PathBuf,
    threads: usize,
    prefill: PrefillConfig,
    decode: DecodeConfig,
    router: pdserve_router::RouterConfig,
    prefill_parts: services::Parts,
    decode_parts: services::Parts,
}

async fn serve_all(plan: UpPlan) -> anyhow::Result<()> {
    let UpPlan {
        file,
        dir,
        threads,
        prefill,
        decode,
        mut router,
        prefill_parts,
        decode_parts,
    } = plan;
    let public = tokio::net::TcpListener::bind(&router.listen)
        .await
        .with_context(|| format!("binding the OpenAI endpoint to {}", router.listen))?;
    let public_addr = public.local_addr()?;
    let prefill_listener = prefill
        .bind()
        .await
        .context("binding the prefill instance")?;
    let decode_listeners: DecodeListeners =
        decode.bind().await.context("binding the decode instance")?;
    let prefill_addr = prefill_listener.local_addr()?;
    let decode_addr = decode_listeners.http.local_addr()?;
    let kv_addr = decode_listeners.kv.local_addr()?;
    router.prefill = vec![InstanceConfig {
        id: prefill.instance_id.clone(),
        url: format!("http://{prefill_addr}"),
        kv_addr: None,
    }];
    router.decode = vec![InstanceConfig {
        id: decode.instance_id.clone(),
        url: format!("http://{decode_addr}"),
        kv_addr: Some(kv_addr.to_string()),
    }];
    router.validate().map_err(|e| anyhow!("{e}"))?;

    let prefill_experts = services::describe_experts(&prefill_parts);
    let decode_experts = services::describe_experts(&decode_parts);
    let (stop_instances, instances_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let prefill_service = PrefillService::start(prefill.clone(), prefill_parts)
        .map_err(|e| anyhow!("prefill: {e}"))?;
    let decode_service = DecodeService::start(decode.clone(), decode_parts, decode_listeners.kv)
        .map_err(|e| anyhow!("decode: {e}"))?;
    // One scrape target: the router's /metrics renders its own metrics, then the instances'
    // (each series labelled `instance="<id>"`; docs/metrics.md).
    let state = AppState::new(router).map_err(|e| anyhow!("router: {e}"))?;
    let instance_metrics: [MetricsSource; 2] = [
        Arc::new(prefill_service.metrics_renderer()),
        Arc::new(decode_service.metrics_renderer()),
    ];
    for source in instance_metrics {
        state.metrics.add_source(source);
    }
    let prefill_task =
        tokio::spawn(prefill_service.serve(prefill_listener, wait(instances_rx.clone())));
    let decode_task = tokio::spawn(decode_service.serve(decode_listeners.http, wait(instances_rx)));

    let sim = &file.sim;
    println!("pdserve up: listening on http://{public_addr}");
    println!(
        "  model        {} (served as `{}`; {threads} matmul threads)",
        dir.display(),
        state.config.model
    );
    println!(
        "  simulating   {} hardware, modeled shape `{}`, {} mode, time_scale {}{}",
        sim.hardware,
        sim.modeled_model,
        match sim.mode {
            Mode::Detailed => "detailed",
            Mode::Analysis => "analysis",
        },
        prefill.engine.time_scale,
        if prefill.engine.time_scale == 0.0 {
            " (no pacing)"
        } else {
            ""
        }
    );
    println!(
        "  prefill      {} at http://{prefill_addr} (EP{})",
        prefill.instance_id, sim.prefill_ep_size
    );
    println!(
        "  decode       {} at http://{decode_addr}, KV {kv_addr} (EP{})",
        decode.instance_id, sim.decode_ep_size
    );
    println!(
        "  experts      prefill {} / decode {}",
        prefill_experts, decode_experts
    );
    let on = |b: bool| if b { "on" } else { "off" };
    println!(
        "  engine       MTP {} (draft tokens per step: {}), two-batch overlap prefill {} / decode {}",
        on(decode.engine.scheduler.spec_tokens > 0),
        decode.engine.scheduler.spec_tokens,
        on(prefill.engine.scheduler.two_batch_overlap.is_some()),
        on(decode.engine.scheduler.two_batch_overlap.is_some()),
    );
    println!("  try          curl http://{public_addr}/v1/models");
    let served = pdserve_router::serve_state(state, public, services::shutdown_signal()).await;
    let _ = stop_instances.send(true);
    let prefill_done = prefill_task.await;
    let decode_done = decode_task.await;
    served.map_err(|e| anyhow!("router: {e}"))?;
    prefill_done
        .context("prefill task")?
        .map_err(|e| anyhow!("prefill: {e}"))?;
    decode_done
        .context("decode task")?
        .map_err(|e| anyhow!("decode: {e}"))?;
    println!("pdserve up: stopped");
    Ok(())
}
