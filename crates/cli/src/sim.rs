//! `pdserve sim`: the simulated fabric on its own — the paper's analysis, KV sizes, one simulated
//! step with its trace, EP sweeps, the DeepEP comparison, and a benchmark of the simulator.
//!
//! Every figure printed here comes from `pdserve-fabric`; this module only parses arguments,
//! formats tables and (for `bench`) reads the wall clock.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use pdserve_fabric::{
    AnalysisLink, CollectiveKind, DeepEpRow, DispatchPath, HardwareProfile, Mode, ModelShape,
    PaperAssumptions, Scenario, Schedule, SweepPoint, deepep_comparison, ep_sweep, paper_analysis,
};

/// Arguments of `pdserve sim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: SimCommand,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// The paper's speed-limit table (ISCA '25 §2.3.2) for a hardware profile.
    Analyze(AnalyzeArgs),
    /// KV cache bytes per token of DeepSeek-V3 (MLA), Qwen2.5-72B, Llama-3.1-405B (GQA), V2-Lite.
    Kv(KvArgs),
    /// Simulate one step of a scenario (config/sim/*.toml) and optionally write its trace.
    Step(StepArgs),
    /// Detailed-mode EP sweep: node-limited vs uniform routing, TBO on vs off.
    Sweep(SweepArgs),
    /// Detailed-mode collectives against DeepEP's measured low-latency kernels.
    Deepep(DeepepArgs),
    /// Wall time of simulating one step against the simulated step time.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LinkArg {
    /// The NIC (scale-out).
    Nic,
    /// NVLink (scale-up).
    ScaleUp,
}

#[derive(Debug, clap::Args)]
struct AnalyzeArgs {
    /// Built-in profile (h800, h100, gb200-nvl72) or a profile TOML file.
    #[arg(long, default_value = "h800")]
    hardware: String,
    /// Hidden size; both the paper's 7000 ("7K") and DeepSeek-V3's 7168 when absent.
    #[arg(long)]
    hidden: Option<u64>,
    /// Link that carries EP traffic; default: NVLink when the profile's NVLink domain spans
    /// several nodes (GB200 NVL72), else the NIC.
    #[arg(long, value_enum)]
    link: Option<LinkArg>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct KvArgs {
    /// Built-in shape names or config.json paths; default: the four of the paper's Table 1.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScheduleArg {
    /// TBO on.
    Tbo,
    /// TBO off: one batch, no overlap.
    Single,
    /// Two micro-batches without overlap.
    SerialMicroBatches,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PathArg {
    /// NIC to the same in-node index, then NVLink (DeepEP normal kernels).
    Forwarded,
    /// Every copy over the NIC (DeepEP low-latency V1).
    Direct,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// The paper's assumptions.
    Analysis,
    /// Topology, contention, latency, compute.
    Detailed,
}

#[derive(Debug, clap::Args)]
struct StepArgs {
    /// Built-in scenario (decode-ep144, decode-ep128-profile, prefill-ep32, decode-gb200-nvl72,
    /// paper-h800) or a scenario TOML file.
    #[arg(long, default_value = "decode-ep144")]
    config: String,
    /// Write the step's Chrome/Perfetto trace JSON here.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Override the scenario's schedule.
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// Override the scenario's dispatch path.
    #[arg(long, value_enum)]
    path: Option<PathArg>,
    /// Override the scenario's mode.
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// Base scenario; its EP size, routing kind, schedule and redundancy are swept.
    #[arg(long, default_value = "decode-ep144")]
    config: String,
    /// Hardware profile replacing the scenario's.
    #[arg(long)]
    hardware: Option<String>,
    /// EP sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,144,256,320")]
    ep: Vec<u32>,
    /// Distinct routing layers per point (fewer is faster; reused cyclically).
    #[arg(long, default_value_t = 8)]
    routing_layers: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DeepepArgs {
    /// Hardware profile.
    #[arg(long, default_value = "h800")]
    hardware: String,
    /// Seed of the uniform routing.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Scenario to simulate.
    #[arg(long, default_value = "decode-ep144")]
    config: String,
    /// Distinct routing layers (3 = the tiny model's MoE layers reused cyclically; 58 = a
    /// distinct routing for every DeepSeek-V3 MoE layer).
    #[arg(long, default_value_t = 58)]
    routing_layers: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Threads that build the step's traffic plans (0: the host's available parallelism, at
    /// most 8; 1: on the simulating thread).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs `pdserve sim`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        SimCommand::Analyze(a) => analyze(a),
        SimCommand::Kv(a) => kv(a),
        SimCommand::Step(a) => step(a),
        SimCommand::Sweep(a) => sweep(a),
        SimCommand::Deepep(a) => deepep(a),
        SimCommand::Bench(a) => bench(a),
    }
}

fn analyze(a: AnalyzeArgs) -> anyhow::Result<()> {
    let profile = HardwareProfile::load(&a.hardware)?;
    let link = match a.link {
        Some(LinkArg::Nic) => AnalysisLink::ScaleOut,
        Some(LinkArg::ScaleUp) => AnalysisLink::ScaleUp,
        None => profile.analysis_link(),
    };
    let hiddens = a.hidden.map_or(vec![7000, 7168], |h| vec![h]);
    let rows: Vec<_> = hiddens
        .iter()
        .map(|&h| paper_analysis(&profile, PaperAssumptions::paper(h), link))
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "Speed limit of ISCA '25 §2.3.2 on {}: 2 micro-batches of 32 tokens per GPU, 9 experts per token \
         (8 routed + 1 shared), FP8 dispatch + BF16 combine, 61 layers, compute hidden, no latency.",
        profile.name
    );
    println!(
        "| link | hidden | dispatch µs | combine µs | comm per micro-batch µs | per layer µs | TPOT ms | tok/s per user | tok/s per GPU | tok/s per node ({} GPUs) |",
        profile.node.gpus_per_node
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let link = match r.link {
            AnalysisLink::ScaleOut => format!("NIC {:.0} GB/s", r.link_bytes_per_s / 1e9),
            AnalysisLink::ScaleUp => format!("NVLink {:.0} GB/s", r.link_bytes_per_s / 1e9),
        };
        println!(
            "| {link} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} |",
            r.assumptions.hidden,
            r.dispatch_us,
            r.combine_us,
            r.comm_per_micro_batch_us,
            r.per_layer_us,
            r.tpot_ms,
            r.tokens_per_s_per_user,
            r.tokens_per_s_per_gpu,
            r.tokens_per_s_per_node
        );
    }
    Ok(())
}

fn kv(a: KvArgs) -> anyhow::Result<()> {
    let names = if a.models.is_empty() {
        vec![
            "deepseek-v3".to_string(),
            "qwen2.5-72b".into(),
            "llama-3.1-405b".into(),
            "deepseek-v2-lite".into(),
        ]
    } else {
        a.models
    };
    let shapes: Vec<(String, ModelShape)> = names
        .into_iter()
        .map(|n| ModelShape::load(&n).map(|s| (n, s)))
        .collect::<Result<_, _>>()?;
    let base = shapes
        .first()
        .map_or(1, |(_, s)| s.kv_bytes_per_token())
        .max(1);
    let rows: Vec<serde_json::Value> = shapes
        .iter()
        .map(|(name, s)| {
            let formula = if s.is_mla() {
                format!(
                    "({} kv_lora_rank + {} qk_rope_head_dim) × {} layers × 2 B",
                    s.kv_lora_rank.unwrap_or(0),
                    s.qk_rope_head_dim,
                    s.num_hidden_layers
                )
            } else {
                format!(
                    "2 (K, V) × {} KV heads × {} head dim × {} layers × 2 B",
                    s.kv_heads(),
                    s.gqa_head_dim(),
                    s.num_hidden_layers
                )
            };
            serde_json::json!({
                "model": name,
                "attention": if s.is_mla() { "MLA" } else { "GQA" },
                "formula": formula,
                "kv_bytes_per_token": s.kv_bytes_per_token(),
                "multiplier": s.kv_bytes_per_token() as f64 / base as f64,
            })
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("KV cache per token, BF16 (ISCA '25 Table 1):");
    println!("| model | attention | bytes per token | × first | formula |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}× | {} |",
            r["model"].as_str().unwrap_or(""),
            r["attention"].as_str().unwrap_or(""),
            r["kv_bytes_per_token"],
            r["multiplier"].as_f64().unwrap_or(0.0),
            r["formula"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&a.config)?;
    if let Some(s) = a.schedule {
        scenario.schedule = match s {
            ScheduleArg::Tbo => Schedule::TwoBatchOverlap,
            ScheduleArg::Single => Schedule::SingleBatch,
            ScheduleArg::SerialMicroBatches => Schedule::SerialMicroBatches,
        };
    }
    if let Some(p) = a.path {
        scenario.path = match p {
            PathArg::Forwarded => DispatchPath::Forwarded,
            PathArg::Direct => DispatchPath::Direct,
        };
    }
    if let Some(m) = a.mode {
        scenario.mode = match m {
            ModeArg::Analysis => Mode::Analysis,
            ModeArg::Detailed => Mode::Detailed,
        };
    }
    if let Some(seed) = a.seed {
        scenario.seed = seed;
    }
    let run = scenario.build()?;
    let outcome = run.run(a.trace.is_some())?;
    if let (Some(path), Some(trace)) = (&a.trace, &outcome.trace) {
        std::fs::write(path, trace.to_chrome_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(());
    }
    let n = f64::from(scenario.ep_size);
    println!(
        "{} on {} ({} GPUs, {:?}, {:?}, {:?}, {:?} path, {} routing layer(s) reused cyclically)",
        a.config,
        run.fabric.profile().name,
        scenario.ep_size,
        scenario.phase,
        scenario.schedule,
        scenario.mode,
        scenario.path,
        run.routing.len()
    );
    println!("step time            {:>12.1} µs", outcome.duration_us);
    println!("mean layer           {:>12.1} µs", outcome.mean_layer_us());
    println!("tokens               {:>12}", outcome.tokens);
    println!(
        "tokens/s per GPU     {:>12.0}",
        outcome.tokens as f64 / n / (outcome.duration_us / 1e6)
    );
    println!("compute busy per GPU {:>12.1} µs", outcome.compute_busy_us);
    for (stage, us) in &outcome.stage_busy_us {
        println!("  {:<8}           {:>12.1} µs", stage.label(), us);
    }
    println!(
        "dispatch span (mean) {:>12.1} µs",
        outcome.mean_collective_us(CollectiveKind::Dispatch)
    );
    println!(
        "combine span (mean)  {:>12.1} µs",
        outcome.mean_collective_us(CollectiveKind::Combine)
    );
    println!("NIC bytes per GPU    {:>12.0}", outcome.nic_bytes() / n);
    println!("NVLink bytes per GPU {:>12.0}", outcome.nvlink_bytes() / n);
    if let Some(path) = &a.trace {
        println!("trace written to {}", path.display());
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> anyhow::Result<()> {
    let mut base = Scenario::load(&a.config)?;
    if let Some(h) = a.hardware {
        base.hardware = h;
    }
    base.routing.layers = Some(a.routing_layers);
    let points = ep_sweep(&base, &a.ep)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(());
    }
    println!(
        "{} on {}: {} requests/GPU, {} cached tokens, {} routing layers; isolated collective times \
         are one micro-batch with TBO, the whole batch without.",
        a.config,
        base.hardware,
        base.batch.requests_per_gpu,
        base.batch.cached_tokens,
        a.routing_layers
    );
    println!(
        "| EP | routing | TBO | redundant | dispatch µs | combine µs | NIC MB/GPU/step | layer µs | TPOT ms | tok/s per user | tok/s per GPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &points {
        print_point(p);
    }
    Ok(())
}

fn print_point(p: &SweepPoint) {
    let routing = match p.routing {
        pdserve_fabric::RoutingKindName::NodeLimited => "node-limited",
        pdserve_fabric::RoutingKindName::Uniform => "uniform",
        pdserve_fabric::RoutingKindName::Skewed => "skewed",
        pdserve_fabric::RoutingKindName::Balanced => "balanced",
    };
    let tbo = if p.tbo { "on" } else { "off" };
    if let Some(why) = &p.skipped {
        println!(
            "| {} | {routing} | {tbo} | {} | — | — | — | — | — | — | — ({why}) |",
            p.ep_size, p.redundant_experts
        );
        return;
    }
    println!(
        "| {} | {routing} | {tbo} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.0} |",
        p.ep_size,
        p.redundant_experts,
        p.dispatch_us,
        p.combine_us,
        p.nic_bytes_per_gpu / 1e6,
        p.layer_us,
        p.tpot_us / 1e3,
        p.tokens_per_s_per_user,
        p.tokens_per_s_per_gpu
    );
}

fn deepep(a: DeepepArgs) -> anyhow::Result<()> {
    let profile = HardwareProfile::load(&a.hardware)?;
    let rows = deepep_comparison(&profile, a.seed)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "DeepEP low-latency kernels (V1, 128 tokens/GPU, hidden 7168, top-8, FP8 dispatch, BF16 combine) \
         against {} detailed mode; ratio = simulated / measured.",
        profile.name
    );
    println!(
        "Direct = every copy over the NIC (as the measured kernels); last GPU / mean over GPUs. \
         Forwarded = NIC to the same index, then NVLink (last GPU)."
    );
    println!(
        "| EP | measured dispatch µs | direct last (ratio) | direct mean (ratio) | forwarded (ratio) | measured combine µs | direct last (ratio) | direct mean (ratio) | forwarded (ratio) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        print_deepep(r);
    }
    Ok(())
}

fn print_deepep(r: &DeepEpRow) {
    let cell = |sim: f64, measured: f64| format!("{sim:.1} ({:.2})", sim / measured);
    println!(
        "| {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} |",
        r.ep_size,
        r.measured_dispatch_us,
        cell(r.direct_dispatch_us, r.measured_dispatch_us),
        cell(r.direct_dispatch_mean_us, r.measured_dispatch_us),
        cell(r.forwarded_dispatch_us, r.measured_dispatch_us),
        r.measured_combine_us,
        cell(r.direct_combine_us, r.measured_combine_us),
        cell(r.direct_combine_mean_us, r.measured_combine_us),
        cell(r.forwarded_combine_us, r.measured_combine_us),
    );
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&a.config)?;
    scenario.routing.layers = Some(a.routing_layers);
    let build_start = Instant::now();
    let mut run = scenario.build()?;
    run.fabric = run.fabric.with_plan_threads(a.threads);
    let build_s = build_start.elapsed().as_secs_f64();
    let warm = run.run(false)?;
    let mut walls = Vec::with_capacity(a.iterations.max(1));
    let cpu_start = thread_cpu_ns();
    let process_start = process_cpu_ticks();
    for _ in 0..a.iterations.max(1) {
        let t = Instant::now();
        let outcome = run.run(false)?;
        walls.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(
            outcome.duration_us == warm.duration_us,
            "the simulation is not deterministic"
        );
    }
    let cpu_per_step_us = match (cpu_start, thread_cpu_ns()) {
        (Some(a0), Some(a1)) => Some((a1 - a0) as f64 / 1e3 / walls.len() as f64),
        _ => None,
    };
    let process_cpu_per_step_us = match (process_start, process_cpu_ticks()) {
        (Some((a0, hz)), Some((a1, _))) => Some((a1 - a0) as f64 * 1e6 / hz / walls.len() as f64),
        _ => None,
    };
    walls.sort_by(f64::total_cmp);
    let median = walls[walls.len() / 2];
    let min = walls[0];
    let report = serde_json::json!({
        "config": a.config,
        "ep_size": scenario.ep_size,
        "routing_layers": a.routing_layers,
        "iterations": walls.len(),
        "simulated_step_us": warm.duration_us,
        "wall_min_us": min,
        "wall_median_us": median,
        "wall_over_simulated_median": median / warm.duration_us,
        "plan_threads": run.fabric.plan_threads(),
        "cpu_per_step_us": cpu_per_step_us,
        "process_cpu_per_step_us": process_cpu_per_step_us,
        "scenario_build_s": build_s,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: EP{} decode step, {} distinct routing layer(s), {} timed runs, plans on {} thread(s)",
        a.config,
        scenario.ep_size,
        a.routing_layers,
        walls.len(),
        run.fabric.plan_threads()
    );
    println!("simulated step        {:>10.1} µs", warm.duration_us);
    println!("wall per step, min    {:>10.1} µs", min);
    println!("wall per step, median {:>10.1} µs", median);
    println!(
        "wall / simulated      {:>10.3} (median; below 1 means pacing at time_scale 1 keeps up)",
        median / warm.duration_us
    );
    if let Some(cpu) = cpu_per_step_us {
        println!(
            "CPU per step          {cpu:>10.1} µs (the simulating thread's on-CPU time; less sensitive to other load)"
        );
    }
    if let Some(cpu) = process_cpu_per_step_us {
        println!(
            "process CPU per step  {cpu:>10.1} µs (every thread, plan builders included; clock-tick resolution)"
        );
    }
    println!("(scenario build, not timed above: {build_s:.2} s — synthetic routing generation)");
    Ok(())
}

/// The process's user + system time in clock ticks (every thread, finished ones included) and
/// the ticks per second (Linux `/proc/self/stat`, USER_HZ = 100), when available.
fn process_cpu_ticks() -> Option<(u64, f64)> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = text.get(text.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime, 100.0))
}

/// This thread's on-CPU time in ns (Linux `/proc/thread-self/schedstat`), when available.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}
