//! `pdserve bench`: throughput benchmarks of pdserve's own components.
//!
//! `bench model` measures the model alone on the CPU, with the same definitions as
//! `tools/bench/transformers_bench.py` so the two can be compared at the same thread count:
//! - prefill: one forward over `batch × prompt_len` random prompt tokens (fresh latent cache);
//!   `prefill_tokens_per_s = batch · prompt_len / seconds`;
//! - decode: `decode_steps` greedy steps of one token per sequence through the latent cache
//!   (absorbed attention); `decode_tokens_per_s = batch · decode_steps / seconds`.
//!
//! Each shape runs `--warmup` untimed times, then `--repeats` timed times; the median is reported,
//! with the process CPU time of each phase beside the wall time (useful on a shared host).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use candle_core::Device;
use clap::Subcommand;
use pdserve_model::rng::SplitMix64;
use pdserve_model::{
    ContiguousLatentCache, DeepSeekV3, ForwardOptions, LocalExperts, LogitsWanted, SequenceInput,
};

use crate::model_cmd::{configure_threads, resolve_model};

/// Arguments of `pdserve bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode throughput of the model at several batch sizes.
    Model(ModelArgs),
    /// The decode engine at a configured operating point: simulated TPOT and throughput, real
    /// wall time per step and lag (e.g. `--config config/paper-h800.toml`).
    Decode(crate::bench_decode::Args),
}

#[derive(Debug, clap::Args)]
struct ModelArgs {
    /// Checkpoint directory (default: the embedded tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,32,64,256")]
    batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Greedy decode steps per sequence.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Untimed runs before measuring each shape.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the random prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `pdserve bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Model(a) => bench_model(a),
        BenchCommand::Decode(a) => crate::bench_decode::run(a),
    }
}

struct Timing {
    prefill_s: f64,
    decode_s: f64,
    prefill_cpu_s: Option<f64>,
    decode_cpu_s: Option<f64>,
}

/// CPU time of this process (all threads), from `/proc/self/stat` (Linux; 10 ms resolution).
/// Reported next to wall time because the development host is shared: CPU time shows the work
/// done, wall time what a user waits.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (clock ticks of 1/100 s).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn cpu_since(start: Option<f64>) -> Option<f64> {
    Some(process_cpu_s()? - start?)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn one_run(
    model: &DeepSeekV3,
    experts: &LocalExperts,
    prompts: &[Vec<u32>],
    steps: usize,
) -> anyhow::Result<Timing> {
    let c = model.config();
    let dev = model.device();
    let mut cache = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, dev);
    let options = ForwardOptions::default();
    let batch: Vec<SequenceInput> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SequenceInput::new(i as u64, p.clone(), 0).with_logits(LogitsWanted::Last))
        .collect();
    let (t0, c0) = (Instant::now(), process_cpu_s());
    let out = model.forward(&batch, &mut cache, experts, &options)?;
    let mut next: Vec<u32> = out.logits.argmax(1)?.to_vec1()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let prefill_cpu_s = cpu_since(c0);
    let (t1, c1) = (Instant::now(), process_cpu_s());
    for step in 0..steps {
        let pos = prompts[0].len() + step;
        let batch: Vec<SequenceInput> = next
            .iter()
            .enumerate()
            .map(|(i, &t)| SequenceInput::new(i as u64, vec![t], pos))
            .collect();
        let out = model.forward(&batch, &mut cache, experts, &options)?;
        next = out.logits.argmax(1)?.to_vec1()?;
    }
    Ok(Timing {
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        prefill_cpu_s,
        decode_cpu_s: cpu_since(c1),
    })
}

fn bench_model(a: ModelArgs) -> anyhow::Result<()> {
    let threads = configure_threads(a.threads)?;
    if a.batch_sizes.is_empty()
        || a.batch_sizes.contains(&0)
        || a.prompt_len == 0
        || a.decode_steps == 0
        || a.repeats == 0
    {
        bail!("--batch-sizes, --prompt-len, --decode-steps and --repeats must be at least 1");
    }
    let dir = resolve_model(a.model.as_deref())?;
    let (model, experts) = DeepSeekV3::load(&dir, &Device::Cpu)?;
    let c = model.config();
    if a.prompt_len + a.decode_steps > c.max_position_embeddings {
        bail!(
            "--prompt-len + --decode-steps = {} exceeds max_position_embeddings {}",
            a.prompt_len + a.decode_steps,
            c.max_position_embeddings
        );
    }
    let mut rng = SplitMix64::new(a.seed);
    let mut rows = Vec::new();
    for &b in &a.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..a.prompt_len)
                    .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
                    .collect()
            })
            .collect();
        for _ in 0..a.warmup {
            one_run(&model, &experts, &prompts, a.decode_steps)?;
        }
        let mut runs = Vec::new();
        for _ in 0..a.repeats {
            runs.push(one_run(&model, &experts, &prompts, a.decode_steps)?);
        }
        let p = median(runs.iter().map(|t| t.prefill_s).collect());
        let d = median(runs.iter().map(|t| t.decode_s).collect());
        let cpu = |f: fn(&Timing) -> Option<f64>| -> Option<f64> {
            runs.iter().map(f).collect::<Option<Vec<f64>>>().map(median)
        };
        let (pc, dc) = (cpu(|t| t.prefill_cpu_s), cpu(|t| t.decode_cpu_s));
        rows.push(serde_json::json!({
            "batch": b,
            "prefill_s": p,
            "prefill_tokens_per_s": (b * a.prompt_len) as f64 / p,
            "decode_s": d,
            "decode_tokens_per_s": (b * a.decode_steps) as f64 / d,
            "decode_step_ms": d * 1e3 / a.decode_steps as f64,
            "prefill_cpu_s": pc,
            "decode_cpu_s": dc,
        }));
        if !a.json {
            eprintln!("batch {b}: done");
        }
    }
    if a.json {
        let report = serde_json::json!({
            "implementation": "pdserve",
            "model": dir,
            "threads": threads,
            "prompt_len": a.prompt_len,
            "decode_steps": a.decode_steps,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} | {threads} threads | prompt {} tokens | {} decode steps | median of {}",
        dir.display(),
        a.prompt_len,
        a.decode_steps,
        a.repeats
    );
    println!(
        "{:>6} {:>16} {:>16} {:>10} {:>14} {:>14}",
        "batch", "prefill tok/s", "decode tok/s", "step ms", "prefill cpu s", "decode cpu s"
    );
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for r in &rows {
        println!(
            "{:>6} {:>16.0} {:>16.0} {:>10.2} {:>14.2} {:>14.2}",
            r["batch"],
            num(&r["prefill_tokens_per_s"]),
            num(&r["decode_tokens_per_s"]),
            num(&r["decode_step_ms"]),
            num(&r["prefill_cpu_s"]),
            num(&r["decode_cpu_s"]),
        );
    }
    Ok(())
}
