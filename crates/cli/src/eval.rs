//! `pdserve eval`: a checkpoint's held-out perplexity and MTP acceptance, measured by pdserve.
//!
//! The text is a `.jsonl` file with one `{"source", "name", "text"}` document per line (the format
//! of `tools/train/build_corpus.py`; `tools/train/heldout/sample.jsonl` is committed), or any other
//! file read as one document of source `text`. Every document is encoded as `BOS text EOS` and the
//! documents of one source are concatenated in file order, exactly as `tools/train/train_tokenizer.py`
//! writes `heldout_<source>.bin` (`--write-tokens DIR` writes those files, so
//! `tools/train/evaluate.py --data-dir DIR` evaluates the very same tokens).
//!
//! Three measurements:
//! - **Perplexity** (teacher-forced, the model alone): each source's stream is cut into consecutive
//!   windows of `--window` predicted tokens (the context the model was trained with; windows share
//!   one boundary token and start cold, as `evaluate.py` does, plus a last shorter window);
//!   `exp(mean NLL)` per source and over all tokens. The MTP module's next-next-token perplexity
//!   (`h_i`, `t_{i+1}` → `t_{i+2}`) and both top-1 accuracies come from the same windows.
//! - **MTP acceptance on held-out prefixes**: the decode engine (scheduler, paged latent cache,
//!   [`ModelExecutor`] with MTP on, greedy drafts, temperature 0) serves one request per random
//!   held-out prefix with `max_tokens = 2`: the prefill samples `g` and the MTP module drafts `d`; the
//!   next decode step verifies `d` against the main model's greedy token. The figure is the engine's
//!   own counters (`EngineStats::spec_accepted_tokens_total / spec_draft_tokens_total`).
//! - **MTP acceptance along greedy continuations**: held-out prompts continued greedily, every
//!   decode step verifying the pending draft; the same counters. The same requests also run with MTP
//!   off: the tokens must be identical (greedy verification is exact) and the tokens per decode step
//!   show the step saving.
//!
//! Prefixes and prompts are drawn from the concatenation of all sources with `SplitMix64(--seed)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use candle_core::Device;
use pdserve_engine::{
    EngineStats, ExecStats, Executor, ExecutorConfig, FinishReason, ModelExecutor, Request,
    RequestId, Scheduler, SchedulerConfig, StopConditions,
};
use pdserve_model::rng::SplitMix64;
use pdserve_model::{
    ContiguousLatentCache, DeepSeekV3, ForwardOptions, LocalExperts, LogitsWanted, SamplingParams,
    SequenceInput, Tokenizer,
};
use serde::Serialize;

use crate::model_cmd::configure_threads;
use crate::services::resolve_model;

/// Arguments of `pdserve eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory with tokenizer files (default: models/tiny-v1, as `pdserve up`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out text: `.jsonl` documents (`{"source", "name", "text"}`) or one plain-text document.
    #[arg(long)]
    text: PathBuf,
    /// Predicted tokens per perplexity window (the training context of models/tiny-v1).
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Held-out prefixes for the acceptance on prefixes (one verified draft each).
    #[arg(long, default_value_t = 1024)]
    prefixes: usize,
    /// Shortest prefix, in tokens.
    #[arg(long, default_value_t = 16)]
    prefix_min: usize,
    /// Longest prefix, in tokens.
    #[arg(long, default_value_t = 256)]
    prefix_max: usize,
    /// Held-out prompts continued greedily.
    #[arg(long, default_value_t = 64)]
    continuations: usize,
    /// Tokens of each continuation prompt.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Tokens generated per continuation.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Seed of the prefix and prompt choice.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Write each source's token stream as `heldout_<source>.bin` (little-endian u16) in DIR, the
    /// input of `tools/train/evaluate.py --data-dir DIR`.
    #[arg(long)]
    write_tokens: Option<PathBuf>,
    /// Matmul threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// One held-out document.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Document {
    /// Corpus source (`bible`, `shakespeare`); perplexity is reported per source.
    #[serde(default = "default_source")]
    pub source: String,
    /// Name (chapter, play).
    #[serde(default)]
    pub name: String,
    /// The text.
    pub text: String,
}

fn default_source() -> String {
    "text".into()
}

/// What to measure (everything but the model and the text).
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Predicted tokens per perplexity window.
    pub window: usize,
    /// Prefixes for acceptance on prefixes.
    pub prefixes: usize,
    /// Shortest prefix.
    pub prefix_min: usize,
    /// Longest prefix.
    pub prefix_max: usize,
    /// Greedy continuations.
    pub continuations: usize,
    /// Prompt tokens per continuation.
    pub prompt_len: usize,
    /// Generated tokens per continuation.
    pub new_tokens: usize,
    /// Seed of prefix and prompt choice.
    pub seed: u64,
}

/// Perplexity of one token stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Perplexity {
    /// Predicted tokens.
    pub tokens: usize,
    /// Mean next-token negative log-likelihood (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Fraction of positions whose argmax is the next token.
    pub top1: f64,
    /// Tokens predicted by the MTP module (`t_{i+2}`).
    pub mtp_tokens: usize,
    /// The MTP module's mean NLL.
    pub mtp_nll: f64,
    /// `exp(mtp_nll)`.
    pub mtp_ppl: f64,
    /// The MTP module's top-1 accuracy.
    pub mtp_top1: f64,
}

/// The engine's spec-decode counters over one workload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Acceptance {
    /// Requests served.
    pub requests: usize,
    /// Decode steps that verified a draft (`EngineStats::spec_drafts_total`).
    pub drafts: u64,
    /// Draft tokens accepted (`EngineStats::spec_accepted_tokens_total`).
    pub accepted: u64,
    /// Accepted drafts per draft position (`EngineStats::spec_accepted_per_pos`).
    pub accepted_per_pos: Vec<u64>,
    /// `accepted / drafts` (0 without drafts).
    pub rate: f64,
    /// The executor's own count of verified drafts (`ExecStats::drafts_verified_total`).
    pub exec_drafts_verified: u64,
    /// The executor's accepted drafts per position (`ExecStats::drafts_accepted_per_pos`).
    pub exec_accepted_per_pos: Vec<u64>,
    /// Decode slots run (one per request per decode step).
    pub decode_slots: u64,
    /// Output tokens produced by decode steps (the prefill's first token excluded).
    pub decode_tokens: u64,
    /// `decode_tokens / decode_slots`: tokens a request gains per decode step.
    pub tokens_per_decode_step: f64,
    /// With MTP off (continuations only): decode tokens per step and whether every request's
    /// tokens equal the MTP-on run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtp_off: Option<MtpOff>,
}

/// The continuation workload rerun with MTP off.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MtpOff {
    /// Decode tokens per decode step (1 without drafts).
    pub tokens_per_decode_step: f64,
    /// Every request produced the same tokens with MTP on and off.
    pub identical_tokens: bool,
}

/// Everything `pdserve eval` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// Documents per source.
    pub documents: BTreeMap<String, usize>,
    /// The settings measured with.
    pub settings: Settings,
    /// Perplexity per source (sorted by name) and `all` (token-weighted over the sources).
    pub perplexity: BTreeMap<String, Perplexity>,
    /// Greedy MTP acceptance on held-out prefixes.
    pub accept_prefixes: Acceptance,
    /// Greedy MTP acceptance along greedy continuations.
    pub accept_greedy: Acceptance,
    /// Wall seconds of the perplexity, prefix and continuation phases.
    pub wall_s: [f64; 3],
}

/// Runs `pdserve eval`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let threads = configure_threads(args.threads)?;
    let dir = resolve_model(args.model.as_deref())?;
    let docs = read_documents(&args.text)?;
    let settings = Settings {
        window: args.window,
        prefixes: args.prefixes,
        prefix_min: args.prefix_min,
        prefix_max: args.prefix_max,
        continuations: args.continuations,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        seed: args.seed,
    };
    let report = evaluate(&dir, &docs, &settings, args.write_tokens.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &args.text, threads);
    }
    Ok(())
}

/// Reads `.jsonl` documents, or the whole file as one document; errors name the file and line.
pub fn read_documents(path: &Path) -> anyhow::Result<Vec<Document>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<Document>(line).with_context(|| {
                    format!(
                        "{} line {}: expected {{\"source\", \"name\", \"text\"}}",
                        path.display(),
                        i + 1
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        vec![Document {
            source: default_source(),
            name: path.display().to_string(),
            text,
        }]
    };
    if docs.is_empty() {
        bail!("{} holds no document", path.display());
    }
    Ok(docs)
}

/// Measures the checkpoint in `dir` on `docs`; see the module docs.
pub fn evaluate(
    dir: &Path,
    docs: &[Document],
    s: &Settings,
    write_tokens: Option<&Path>,
) -> anyhow::Result<Report> {
    if s.window < 2 {
        bail!("--window must be at least 2, got {}", s.window);
    }
    if s.prefix_min == 0 || s.prefix_min > s.prefix_max {
        bail!(
            "--prefix-min ({}) must be at least 1 and at most --prefix-max ({})",
            s.prefix_min,
            s.prefix_max
        );
    }
    if s.prompt_len == 0 || s.new_tokens < 2 {
        bail!("--prompt-len must be at least 1 and --new-tokens at least 2");
    }
    let (model, experts) = DeepSeekV3::load(dir, &Device::Cpu)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    if !model.has_mtp() {
        bail!(
            "{} has no MTP module (num_nextn_predict_layers = 0)",
            dir.display()
        );
    }
    let tokenizer = Tokenizer::from_dir(dir)
        .with_context(|| format!("{} needs tokenizer.json to read text", dir.display()))?;
    let config = model.config();
    let bos = tokenizer
        .bos_id()
        .or(config.bos_token_id)
        .ok_or_else(|| anyhow!("{}: no BOS token in the tokenizer or config", dir.display()))?;
    let eos_list = config.eos_ids();
    let eos = tokenizer
        .eos_id()
        .or(eos_list.first().copied())
        .ok_or_else(|| anyhow!("{}: no EOS token in the tokenizer or config", dir.display()))?;

    let mut streams: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut documents: BTreeMap<String, usize> = BTreeMap::new();
    for d in docs {
        let stream = streams.entry(d.source.clone()).or_default();
        stream.push(bos);
        stream.extend(tokenizer.encode(&d.text)?);
        stream.push(eos);
        *documents.entry(d.source.clone()).or_default() += 1;
    }
    if let Some(out) = write_tokens {
        write_token_files(out, &streams)?;
    }

    let t0 = Instant::now();
    let mut perplexity = BTreeMap::new();
    for (source, tokens) in &streams {
        perplexity.insert(
            source.clone(),
            stream_perplexity(&model, &experts, tokens, s.window)?,
        );
    }
    let all = combine(perplexity.values());
    perplexity.insert("all".into(), all);
    let ppl_s = t0.elapsed().as_secs_f64();

    let all_tokens: Vec<u32> = streams.values().flatten().copied().collect();
    let model = Arc::new(model);
    let mut eos_ids = eos_list;
    eos_ids.push(eos);
    let engine = EngineSetup {
        model: &model,
        experts: &experts,
        eos: &eos_ids,
    };

    let t1 = Instant::now();
    let mut rng = SplitMix64::for_stream(s.seed, "pdserve-eval-prefixes");
    let prefixes = draw_prompts(
        &all_tokens,
        s.prefixes,
        s.prefix_min,
        s.prefix_max,
        &mut rng,
    )?;
    let run = engine.run(&prefixes, 2, true)?;
    let accept_prefixes = run.acceptance(prefixes.len());
    let prefix_s = t1.elapsed().as_secs_f64();

    let t2 = Instant::now();
    let mut rng = SplitMix64::for_stream(s.seed, "pdserve-eval-continuations");
    let prompts = draw_prompts(
        &all_tokens,
        s.continuations,
        s.prompt_len,
        s.prompt_len,
        &mut rng,
    )?;
    let on = engine.run(&prompts, s.new_tokens, true)?;
    let off = engine.run(&prompts, s.new_tokens, false)?;
    let mut accept_greedy = on.acceptance(prompts.len());
    accept_greedy.mtp_off = Some(MtpOff {
        tokens_per_decode_step: off.acceptance(prompts.len()).tokens_per_decode_step,
        identical_tokens: on.outputs == off.outputs,
    });
    let greedy_s = t2.elapsed().as_secs_f64();

    Ok(Report {
        model: dir.to_path_buf(),
        documents,
        settings: s.clone(),
        perplexity,
        accept_prefixes,
        accept_greedy,
        wall_s: [ppl_s, prefix_s, greedy_s],
    })
}

fn write_token_files(dir: &Path, streams: &BTreeMap<String, Vec<u32>>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (source, tokens) in streams {
        if source.is_empty()
            || !source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!("source `{source}` is not usable in a file name (letters, digits, `_`, `-`)");
        }
        let mut bytes = Vec::with_capacity(2 * tokens.len());
        for &t in tokens {
            let t = u16::try_from(t).map_err(|_| anyhow!("token id {t} does not fit in u16"))?;
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        let path = dir.join(format!("heldout_{source}.bin"));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Sums of one perplexity pass.
#[derive(Default)]
struct Sums {
    nll: f64,
    n: usize,
    hits: usize,
}

impl Sums {
    /// Adds the rows of `logits` (`[rows, vocab]`, row-major) against `targets`.
    fn add(&mut self, logits: &[f32], vocab: usize, targets: &[u32]) -> anyhow::Result<()> {
        if logits.len() != targets.len() * vocab {
            bail!(
                "{} logits for {} targets of vocabulary {vocab}",
                logits.len(),
                targets.len()
            );
        }
        for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
            let (nll, argmax) = row_nll(row, target as usize)?;
            self.nll += nll;
            self.n += 1;
            self.hits += usize::from(argmax == target as usize);
        }
        Ok(())
    }
}

/// Negative log-likelihood of `target` under softmax(`row`) (f64) and the row's argmax (lowest id
/// on ties).
fn row_nll(row: &[f32], target: usize) -> anyhow::Result<(f64, usize)> {
    let mut argmax = 0;
    let mut max = f64::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if f64::from(v) > max {
            max = f64::from(v);
            argmax = i;
        }
    }
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let at = row
        .get(target)
        .ok_or_else(|| anyhow!("target token {target} outside the vocabulary {}", row.len()))?;
    let nll = max + sum.ln() - f64::from(*at);
    if !nll.is_finite() {
        bail!("non-finite log-likelihood (logits contain NaN or infinity)");
    }
    Ok((nll, argmax))
}

/// Teacher-forced perplexity of one stream in windows of `window` predicted tokens.
fn stream_perplexity(
    model: &DeepSeekV3,
    experts: &LocalExperts,
    tokens: &[u32],
    window: usize,
) -> anyhow::Result<Perplexity> {
    let c = model.config();
    let vocab = c.vocab_size;
    let options = ForwardOptions::default();
    let (mut main, mut mtp) = (Sums::default(), Sums::default());
    let predicted = tokens.len().saturating_sub(1);
    let mut start = 0;
    while start < predicted {
        let end = (start + window).min(predicted);
        let x = &tokens[start..=end];
        let inputs = &x[..x.len() - 1];
        let mut cache =
            ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu);
        let out = model.forward(
            &[SequenceInput::new(0, inputs.to_vec(), 0).with_logits(LogitsWanted::All)],
            &mut cache,
            experts,
            &options,
        )?;
        main.add(&out.logits.flatten_all()?.to_vec1()?, vocab, &x[1..])?;
        if x.len() >= 3 {
            let n = inputs.len() - 1;
            let hidden = out.hidden.narrow(0, 0, n)?;
            let next = SequenceInput::new(0, x[1..=n].to_vec(), 0).with_logits(LogitsWanted::All);
            let m = model.mtp_forward(&[next], &hidden, &mut cache, experts, &options)?;
            mtp.add(&m.logits.flatten_all()?.to_vec1()?, vocab, &x[2..])?;
        }
        start = end;
    }
    Ok(perplexity_of(&main, &mtp))
}

fn perplexity_of(main: &Sums, mtp: &Sums) -> Perplexity {
    let mean = |s: &Sums| if s.n == 0 { 0.0 } else { s.nll / s.n as f64 };
    let frac = |s: &Sums| {
        if s.n == 0 {
            0.0
        } else {
            s.hits as f64 / s.n as f64
        }
    };
    Perplexity {
        tokens: main.n,
        nll: mean(main),
        ppl: mean(main).exp(),
        top1: frac(main),
        mtp_tokens: mtp.n,
        mtp_nll: mean(mtp),
        mtp_ppl: mean(mtp).exp(),
        mtp_top1: frac(mtp),
    }
}

/// Token-weighted combination of per-source figures.
fn combine<'a>(parts: impl Iterator<Item = &'a Perplexity>) -> Perplexity {
    let (mut main, mut mtp) = (Sums::default(), Sums::default());
    for p in parts {
        main.n += p.tokens;
        main.nll += p.nll * p.tokens as f64;
        main.hits += (p.top1 * p.tokens as f64).round() as usize;
        mtp.n += p.mtp_tokens;
        mtp.nll += p.mtp_nll * p.mtp_tokens as f64;
        mtp.hits += (p.mtp_top1 * p.mtp_tokens as f64).round() as usize;
    }
    perplexity_of(&main, &mtp)
}

/// `n` slices of `tokens` with lengths uniform in `min..=max` at uniform starts.
fn draw_prompts(
    tokens: &[u32],
    n: usize,
    min: usize,
    max: usize,
    rng: &mut SplitMix64,
) -> anyhow::Result<Vec<Vec<u32>>> {
    if tokens.len() < max + 2 {
        bail!(
            "the text has {} tokens, fewer than the longest prompt ({max}) + 2",
            tokens.len()
        );
    }
    let below = |rng: &mut SplitMix64, bound: usize| (rng.next_u64() % bound as u64) as usize;
    Ok((0..n)
        .map(|_| {
            let len = min + below(rng, max - min + 1);
            let start = below(rng, tokens.len() - max - 1);
            tokens[start..start + len].to_vec()
        })
        .collect())
}

struct EngineSetup<'a> {
    model: &'a Arc<DeepSeekV3>,
    experts: &'a LocalExperts,
    eos: &'a [u32],
}

/// The outcome of one engine run.
struct EngineRun {
    outputs: Vec<Vec<u32>>,
    stats: EngineStats,
    exec: ExecStats,
    decode_slots: u64,
}

impl EngineSetup<'_> {
    /// Serves greedy requests (`max_tokens` each, EOS ignored) to completion through the scheduler
    /// and the model executor, MTP on or off.
    fn run(&self, prompts: &[Vec<u32>], max_tokens: usize, mtp: bool) -> anyhow::Result<EngineRun> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let context = (longest + max_tokens + 1).next_multiple_of(64);
        let scheduler = Scheduler::new(SchedulerConfig {
            num_kv_blocks: 512.max(2 * context / 64),
            max_context_tokens: context,
            spec_tokens: usize::from(mtp),
            ..SchedulerConfig::default()
        })?;
        let mut executor = ModelExecutor::new(
            Arc::clone(self.model),
            self.experts.clone(),
            ExecutorConfig::for_scheduler(scheduler.config(), 1),
        )?;
        let mut state = scheduler.new_state::<SamplingParams>();
        for (i, prompt) in prompts.iter().enumerate() {
            let stop = StopConditions {
                max_tokens: Some(max_tokens),
                eos_token_ids: self.eos.to_vec(),
                ignore_eos: true,
                ..StopConditions::default()
            };
            let request = Request::new(
                RequestId(i as u64),
                prompt.clone(),
                SamplingParams::greedy(),
            )
            .with_stop(stop);
            state.add_request(request)?;
        }
        let mut outputs = vec![Vec::new(); prompts.len()];
        let mut decode_slots = 0;
        let mut now_ns = 0u64;
        while state.has_work() {
            let plan = scheduler.step(now_ns, &mut state)?;
            decode_slots += plan.decodes.len() as u64;
            let out = executor.execute(&plan)?;
            for update in state.apply(out.seqs)? {
                if let Some(f) = &update.finish
                    && f.reason == FinishReason::Error
                {
                    bail!(
                        "request {} failed: {}",
                        update.id.0,
                        f.message.as_deref().unwrap_or("")
                    );
                }
                let slot = outputs
                    .get_mut(update.id.0 as usize)
                    .ok_or_else(|| anyhow!("unknown request {}", update.id.0))?;
                slot.extend(update.tokens);
            }
            now_ns += 1;
        }
        Ok(EngineRun {
            outputs,
            stats: state.stats().clone(),
            exec: executor.stats().clone(),
            decode_slots,
        })
    }
}

impl EngineRun {
    fn acceptance(&self, requests: usize) -> Acceptance {
        let s = &self.stats;
        let decode_tokens = self.outputs.iter().map(|o| o.len() as u64).sum::<u64>()
            - self.outputs.iter().filter(|o| !o.is_empty()).count() as u64;
        Acceptance {
            requests,
            drafts: s.spec_draft_tokens_total,
            accepted: s.spec_accepted_tokens_total,
            accepted_per_pos: s.spec_accepted_per_pos.clone(),
            rate: s.spec_acceptance_rate().unwrap_or(0.0),
            exec_drafts_verified: self.exec.drafts_verified_total,
            exec_accepted_per_pos: self.exec.drafts_accepted_per_pos.clone(),
            decode_slots: self.decode_slots,
            decode_tokens,
            tokens_per_decode_step: if self.decode_slots == 0 {
                0.0
            } else {
                decode_tokens as f64 / self.decode_slots as f64
            },
            mtp_off: None,
        }
    }
}

fn print_report(r: &Report, text: &Path, threads: usize) {
    let docs: Vec<String> = r
        .documents
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    println!(
        "pdserve eval: {} on {} ({} documents: {}; {threads} threads)",
        r.model.display(),
        text.display(),
        r.documents.values().sum::<usize>(),
        docs.join(", ")
    );
    println!(
        "perplexity, teacher-forced in {}-token windows ({:.1} s):",
        r.settings.window, r.wall_s[0]
    );
    println!(
        "  {:<14} {:>8} {:>9} {:>7} {:>13} {:>9}",
        "set", "tokens", "ppl", "top-1", "MTP(t+2) ppl", "MTP top-1"
    );
    let sources = r
        .perplexity
        .iter()
        .filter(|(name, _)| name.as_str() != "all");
    for (name, p) in sources.chain(r.perplexity.get_key_value("all")) {
        println!(
            "  {name:<14} {:>8} {:>9.2} {:>6.1}% {:>13.2} {:>8.1}%",
            p.tokens,
            p.ppl,
            100.0 * p.top1,
            p.mtp_ppl,
            100.0 * p.mtp_top1
        );
    }
    println!(
        "MTP greedy acceptance, from the engine's spec-decode counters (drafts verified / accepted):"
    );
    println!(
        "  {:<40} {:>8} {:>7} {:>9} {:>7} {:>12}",
        "workload", "requests", "drafts", "accepted", "rate", "tokens/step"
    );
    let s = &r.settings;
    let rows = [
        (
            format!(
                "held-out prefixes ({}-{} tokens) ({:.0} s)",
                s.prefix_min, s.prefix_max, r.wall_s[1]
            ),
            &r.accept_prefixes,
        ),
        (
            format!(
                "greedy continuations ({}+{}) ({:.0} s)",
                s.prompt_len, s.new_tokens, r.wall_s[2]
            ),
            &r.accept_greedy,
        ),
    ];
    for (i, (name, a)) in rows.into_iter().enumerate() {
        // A prefix request stops after its one verified draft: tokens per step say nothing there.
        let per_step = if i == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", a.tokens_per_decode_step)
        };
        println!(
            "  {name:<40} {:>8} {:>7} {:>9} {:>6.1}% {per_step:>12}",
            a.requests,
            a.drafts,
            a.accepted,
            100.0 * a.rate,
        );
    }
    if let Some(off) = &r.accept_greedy.mtp_off {
        println!(
            "  MTP off: {:.3} tokens per decode step; tokens identical to MTP on: {}",
            off.tokens_per_decode_step,
            if off.identical_tokens { "yes" } else { "NO" }
        );
    }
}
