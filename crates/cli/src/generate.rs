//! `pdserve generate`: run the model alone on one prompt — prefill, then token-by-token decode
//! through the latent cache — streaming the text and reporting tokens/s.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow};
use candle_core::Device;
use pdserve_model::{
    ChatMessage, ContiguousLatentCache, DeepSeekV3, ForwardOptions, LatentCache, Sampler,
    SamplingParams, SequenceInput, Tokenizer,
};

use crate::model_cmd::{configure_threads, resolve_model};

/// Arguments of `pdserve generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory with tokenizer files (default: the embedded tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Render the prompt as one user turn with the checkpoint's chat template.
    #[arg(long)]
    chat: bool,
    /// Do not prepend the beginning-of-sequence token to a raw (non-chat) prompt.
    #[arg(long)]
    no_bos: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object (text, token ids, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Runs `pdserve generate`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let threads = configure_threads(args.threads)?;
    if args.max_tokens == 0 {
        return Err(anyhow!("--max-tokens must be at least 1"));
    }
    let dir = resolve_model(args.model.as_deref())?;
    let dev = Device::Cpu;
    let (model, experts) = DeepSeekV3::load(&dir, &dev)?;
    let tokenizer = Tokenizer::from_dir(&dir)
        .context("the checkpoint needs tokenizer.json to generate text")?;
    let mut prompt_ids = if args.chat {
        let text =
            tokenizer.apply_chat_template(&[ChatMessage::new("user", &args.prompt)], true)?;
        tokenizer.encode(&text)?
    } else {
        let mut ids = Vec::new();
        if !args.no_bos {
            ids.extend(tokenizer.bos_id().or(model.config().bos_token_id));
        }
        ids.extend(tokenizer.encode(&args.prompt)?);
        ids
    };
    if prompt_ids.is_empty() {
        prompt_ids.extend(tokenizer.bos_id());
    }
    if prompt_ids.is_empty() {
        return Err(anyhow!("the prompt encodes to no tokens"));
    }
    let mut eos = model.config().eos_ids();
    eos.extend(tokenizer.eos_id());
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: Some(args.seed),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, args.seed)?;
    let c = model.config();
    let mut cache = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu);
    let options = ForwardOptions::default();

    let t0 = Instant::now();
    let out = model.forward(
        &[SequenceInput::new(0, prompt_ids.clone(), 0)],
        &mut cache,
        &experts,
        &options,
    )?;
    let mut next = sampler.sample(&out.last_logits(0)?)?.id;
    let prefill_s = t0.elapsed().as_secs_f64();

    let mut generated = vec![next];
    let mut stream = tokenizer.inner().decode_stream(true);
    let mut stdout = std::io::stdout().lock();
    let mut emit = |id: u32, stdout: &mut std::io::StdoutLock<'_>| -> anyhow::Result<()> {
        if !args.json
            && let Some(piece) = stream
                .step(id)
                .map_err(|e| anyhow!("decoding token {id}: {e}"))?
        {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
        }
        Ok(())
    };
    emit(next, &mut stdout)?;
    let t1 = Instant::now();
    while generated.len() < args.max_tokens && (args.ignore_eos || !eos.contains(&next)) {
        if cache.len(0, 0) + 1 > c.max_position_embeddings {
            break;
        }
        let step = [SequenceInput::new(0, vec![next], cache.len(0, 0))];
        let out = model.forward(&step, &mut cache, &experts, &options)?;
        next = sampler.sample(&out.last_logits(0)?)?.id;
        generated.push(next);
        emit(next, &mut stdout)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_tokens = generated.len() - 1;
    let text = tokenizer.decode(&generated, true)?;
    let prefill_tok_s = prompt_ids.len() as f64 / prefill_s;
    let decode_tok_s = if decode_s > 0.0 {
        decode_tokens as f64 / decode_s
    } else {
        0.0
    };
    if args.json {
        let report = serde_json::json!({
            "model": dir,
            "threads": threads,
            "prompt_tokens": prompt_ids,
            "generated_tokens": generated,
            "text": text,
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": prefill_tok_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": decode_tok_s,
        });
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "prompt {} tokens: prefill {:.1} ms ({:.0} tokens/s); generated {} tokens: decode {:.1} tokens/s \
             ({} threads, {})",
            prompt_ids.len(),
            prefill_s * 1e3,
            prefill_tok_s,
            generated.len(),
            decode_tok_s,
            threads,
            dir.display()
        );
    }
    Ok(())
}
