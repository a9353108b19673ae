//! `pdserve model`: create checkpoints (`init`) and print a checkpoint's logits (`logits`).
//!
//! `logits` prints the main model's logits at every given position and, when the checkpoint has
//! an MTP module, the MTP logits of positions `0..T-1` (input `t_{i+1}` and `h_i`), so any
//! checkpoint can be compared number for number with another implementation (`--json`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Subcommand;
use pdserve_model::{
    ContiguousLatentCache, DeepSeekV3, ForwardOptions, LogitsWanted, SequenceInput, tiny,
};

/// Arguments of `pdserve model`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Write a deterministic random checkpoint (config.json, model.safetensors, tokenizer files).
    Init(InitArgs),
    /// Print the logits (and MTP logits) of a checkpoint for given token ids.
    Logits(LogitsArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Model config (Hugging Face config.json format; default: the embedded
    /// config/models/tiny.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seed of the weights.
    #[arg(long, default_value_t = tiny::DEFAULT_SEED)]
    seed: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct LogitsArgs {
    /// Checkpoint directory (default: the embedded tiny model, created on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated token ids, e.g. `0,17,42`.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// RoPE position of the first token.
    #[arg(long, default_value_t = 0)]
    start_pos: usize,
    /// Print every logit as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs `pdserve model`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Init(a) => init(a),
        ModelCommand::Logits(a) => {
            configure_threads(a.threads)?;
            logits(a)
        }
    }
}

/// Sets `RAYON_NUM_THREADS` (candle's matmul thread count) unless the environment already does.
///
/// Without it candle works the count out from `/proc` on every matmul (tens of µs each, more
/// than a tiny model's matmul), so every model-running subcommand calls this first.
pub(crate) fn configure_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let current = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let n = match (threads, current) {
        (Some(n), _) => n,
        (None, Some(n)) if n > 0 => return Ok(n),
        _ => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    set_thread_env(n);
    Ok(n)
}

#[expect(
    unsafe_code,
    reason = "set_var is unsafe only when other threads may read the environment concurrently; it runs \
              at the start of a subcommand, before the model (and any thread) starts"
)]
fn set_thread_env(n: usize) {
    // SAFETY: called from the main thread before any other thread exists (see `configure_threads`).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

/// The checkpoint directory: `--model`, or the embedded tiny model (created on first use).
pub(crate) fn resolve_model(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => tiny::ensure_default(None).context("preparing the embedded tiny model"),
    }
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    let text = match &a.config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => tiny::TINY_CONFIG_JSON.to_string(),
    };
    let summary = tiny::init_checkpoint(&text, a.seed, &a.out)?;
    println!(
        "wrote {} ({} tensors, {} parameters, seed {}{})",
        a.out.display(),
        summary.tensors,
        summary.parameters,
        a.seed,
        if summary.wrote_tokenizer {
            ", with tokenizer"
        } else {
            "; no tokenizer: the config's vocabulary is smaller than the embedded tokenizer's"
        }
    );
    Ok(())
}

fn logits(a: LogitsArgs) -> anyhow::Result<()> {
    let dir = resolve_model(a.model.as_deref())?;
    let dev = Device::Cpu;
    let (model, experts) = DeepSeekV3::load(&dir, &dev)?;
    let c = model.config();
    let mut cache = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu);
    let input = SequenceInput::new(0, a.tokens.clone(), a.start_pos).with_logits(LogitsWanted::All);
    let out = model.forward(&[input], &mut cache, &experts, &ForwardOptions::default())?;
    let logits: Vec<Vec<f32>> = out.logits.to_vec2()?;
    let mut routing = out.routing.layers.clone();
    let mtp_logits: Option<Vec<Vec<f32>>> = if model.has_mtp() && a.tokens.len() > 1 {
        let t = a.tokens.len();
        let next = SequenceInput::new(0, a.tokens[1..].to_vec(), a.start_pos)
            .with_logits(LogitsWanted::All);
        let hidden = out.hidden.narrow(0, 0, t - 1)?;
        let mtp = model.mtp_forward(
            &[next],
            &hidden,
            &mut cache,
            &experts,
            &ForwardOptions::default(),
        )?;
        routing.extend(mtp.routing.layers);
        Some(mtp.logits.to_vec2()?)
    } else {
        None
    };
    if a.json {
        let routing: Vec<serde_json::Value> = routing
            .iter()
            .map(|l| {
                let k = l.routing.top_k;
                serde_json::json!({
                    "layer": l.layer,
                    "experts": l.routing.ids.chunks(k).collect::<Vec<_>>(),
                    "weights": rows_json(&l.routing.weights.chunks(k).map(<[f32]>::to_vec).collect::<Vec<_>>()),
                })
            })
            .collect();
        let report = serde_json::json!({
            "model": dir,
            "tokens": a.tokens,
            "positions": (a.start_pos..a.start_pos + a.tokens.len()).collect::<Vec<_>>(),
            "logits": rows_json(&logits),
            "mtp_logits": mtp_logits.as_deref().map(rows_json),
            "routing": routing,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({} tokens from position {})",
        dir.display(),
        a.tokens.len(),
        a.start_pos
    );
    for (i, row) in logits.iter().enumerate() {
        println!(
            "pos {:>4} token {:>6}: {}",
            a.start_pos + i,
            a.tokens[i],
            summary(row)
        );
    }
    if let Some(mtp) = &mtp_logits {
        println!("MTP (row i: from h_i and token i+1, predicts token i+2)");
        for (i, row) in mtp.iter().enumerate() {
            println!(
                "pos {:>4} next  {:>6}: {}",
                a.start_pos + i,
                a.tokens[i + 1],
                summary(row)
            );
        }
    }
    Ok(())
}

/// Rows of f32 as JSON numbers written with the shortest decimal that round-trips the f32
/// (not the f64 widening of it), as the goldens' `reference.json` writes them.
fn rows_json(rows: &[Vec<f32>]) -> serde_json::Value {
    let number = |x: f32| {
        format!("{x}")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)
    };
    serde_json::Value::Array(
        rows.iter()
            .map(|r| serde_json::Value::Array(r.iter().map(|&x| number(x)).collect()))
            .collect(),
    )
}

/// `top-5 id:logit …  [min, max]` of one logits row.
fn summary(row: &[f32]) -> String {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
    let top: Vec<String> = idx
        .iter()
        .take(5)
        .map(|&i| format!("{i}:{:.4}", row[i]))
        .collect();
    let (min, max) = row
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    format!("top {}  [min {min:.4}, max {max:.4}]", top.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_are_the_shortest_f32_decimals() {
        let v = rows_json(&[vec![0.1f32, -2.5, 1e-7]]);
        assert_eq!(v.to_string(), "[[0.1,-2.5,1e-7]]");
    }

    #[test]
    fn summary_lists_the_best_tokens_first() {
        let s = summary(&[0.5, 3.0, -1.0, 2.0]);
        assert!(
            s.starts_with("top 1:3.0000 3:2.0000 0:0.5000 2:-1.0000"),
            "{s}"
        );
        assert!(s.ends_with("[min -1.0000, max 3.0000]"), "{s}");
    }
}
