//! `pdserve bench decode`: the decode engine on the real (tiny) model at a configured operating
//! point, priced on the simulated fabric.
//!
//! Reads a [`DecodeBenchConfig`] (`config/paper-h800.toml`, `config/paper-gb200-nvl72.toml`,
//! `config/bench/*.toml`), prefills `ep_size × requests_per_gpu` prompts, runs `steps` decode steps
//! and prints simulated TPOT and tokens/s (per user, GPU, node), real wall time per step and the
//! pacing lag; `--json` prints the report as one JSON object; `--trace FILE` writes the last
//! measured step's timeline as Chrome/Perfetto JSON (open it in ui.perfetto.dev).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use pdserve_engine::decode_bench::BenchTime;
use pdserve_engine::{DecodeBenchConfig, DecodeBenchReport, run_decode_bench};

use crate::model_cmd::configure_threads;

/// Arguments of `pdserve bench decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmark config (TOML): the operating point.
    #[arg(long)]
    pub config: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write the last measured step's timeline (Chrome/Perfetto JSON) to this file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Override `steps`.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Override `fabric.ep_size`.
    #[arg(long)]
    pub ep_size: Option<u32>,
    /// Override `workload.requests_per_gpu`.
    #[arg(long)]
    pub requests_per_gpu: Option<u32>,
    /// Override `engine.tbo` (two-micro-batch overlap).
    #[arg(long)]
    pub tbo: Option<bool>,
    /// Override `engine.mtp` (MTP speculative decoding).
    #[arg(long)]
    pub mtp: Option<bool>,
    /// Override `engine.time_scale` (0 = no pacing).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `pdserve bench decode`.
pub fn run(args: Args) -> anyhow::Result<()> {
    configure_threads(args.threads)?;
    let mut config = DecodeBenchConfig::load(&args.config)?;
    if let Some(v) = args.steps {
        config.steps = v;
    }
    if let Some(v) = args.ep_size {
        config.fabric.ep_size = v;
    }
    if let Some(v) = args.requests_per_gpu {
        config.workload.requests_per_gpu = v;
    }
    if let Some(v) = args.tbo {
        config.engine.tbo = v;
    }
    if let Some(v) = args.mtp {
        config.engine.mtp = v;
    }
    if let Some(v) = args.time_scale {
        config.engine.time_scale = v;
    }
    config.validate()?;

    let origin = Instant::now();
    let mut now_ns = || u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut sleep_ns = |ns: u64| {
        if ns > 0 {
            std::thread::sleep(Duration::from_nanos(ns));
        }
    };
    let mut time = BenchTime {
        now_ns: &mut now_ns,
        sleep_ns: &mut sleep_ns,
    };
    let report = run_decode_bench(&config, &mut time, args.trace.is_some())
        .with_context(|| format!("running {}", args.config.display()))?;
    if let (Some(path), Some(json)) = (&args.trace, &report.trace_json) {
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.trace.as_deref());
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn print_report(r: &DecodeBenchReport, trace: Option<&std::path::Path>) {
    if !r.description.is_empty() {
        println!("{}", r.description);
    }
    println!(
        "operating point: {} x EP{} ({} GPUs/node), modeled {} hidden {}, {:?} mode; TBO {}, MTP {}",
        r.hardware,
        r.ep_size,
        r.gpus_per_node,
        r.modeled_model,
        r.hidden_size,
        r.mode,
        on_off(r.tbo),
        on_off(r.mtp)
    );
    println!(
        "load: {} requests ({} per GPU), {}-token prompts; real model {} ({} experts)",
        r.requests,
        r.requests / r.ep_size.max(1) as usize,
        r.prompt_tokens,
        r.model_dir.display(),
        r.experts
    );
    println!("routing: {}", r.routing_note);
    println!(
        "measured: {} decode steps after {} prefill steps, {} output tokens",
        r.steps, r.warmup_steps, r.output_tokens
    );
    println!("simulated:");
    println!("  step          {:>10.3} ms", r.sim_step_ms);
    println!("  TPOT          {:>10.3} ms", r.sim_tpot_ms);
    if let Some(a) = r.analytic_tpot_ms {
        println!(
            "  analytic TPOT {a:>10.3} ms  (the paper's formula at this hidden size and batch)"
        );
    }
    println!("  tokens/s/user {:>10.1}", r.sim_tokens_per_s_per_user);
    println!("  tokens/s/GPU  {:>10.1}", r.sim_tokens_per_s_per_gpu);
    println!("  tokens/s/node {:>10.1}", r.sim_tokens_per_s_per_node);
    println!("real (this host):");
    println!(
        "  step          {:>10.3} ms  ({:.3} ms planning + model)",
        r.real_step_ms, r.real_execute_ms
    );
    println!("  steps/s       {:>10.2}", r.real_steps_per_s);
    println!("  tokens/s      {:>10.1}", r.real_tokens_per_s);
    println!(
        "pacing: time_scale {}, {} of {} steps late, lag {:.3} ms total",
        r.time_scale, r.late_steps, r.steps, r.lag_ms_total
    );
    if let Some(rate) = r.acceptance_rate {
        println!(
            "MTP: {} of {} drafts accepted ({:.1}%)",
            r.drafts_accepted,
            r.drafts,
            100.0 * rate
        );
    }
    if let Some(path) = trace {
        println!("trace of the last step: {}", path.display());
    }
}
