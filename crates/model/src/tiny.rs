//! Deterministic random checkpoints (`pdserve model init`) and the embedded default model.
//!
//! [`init_checkpoint`] draws every tensor a config needs under DeepSeek's released names, from a
//! seed, with scales chosen so the model is not degenerate: matrices `N(0, 1/√fan_in)`, `lm_head`
//! `N(0, 3/√hidden)`, RMSNorm weights `1 + N(0, 0.1)`, embeddings `N(0, 1)`, router correction
//! bias `N(0, 0.05)` — logits vary by several units and the bias changes real selections. Each
//! tensor has its own stream (seed × name), so the result does not depend on drawing order.
//! Files: `config.json` (the given text, verbatim), `model.safetensors` (f32), and the embedded
//! byte-level BPE `tokenizer.json` + `tokenizer_config.json` (with the chat template).
//!
//! [`ensure_default`] materializes the embedded tiny model (`config/models/tiny.json`, seed 0) on
//! first use under `$PDSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`,
//! in `models/tiny-seed0`. It writes into a temporary sibling and renames it into place, so
//! concurrent first uses never see a half-written directory.

use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, TopkMethod};
use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;
use crate::writer::SafetensorsWriter;

/// `config/models/tiny.json`: DeepSeek-V3's routing structure at small width.
pub const TINY_CONFIG_JSON: &str = include_str!("../../../config/models/tiny.json");
/// `config/models/tokenizer.json`: byte-level BPE, 4096 ids, DeepSeek's special tokens.
pub const TOKENIZER_JSON: &str = include_str!("../../../config/models/tokenizer.json");
/// `config/models/tokenizer_config.json`: special tokens and the chat template.
pub const TOKENIZER_CONFIG_JSON: &str =
    include_str!("../../../config/models/tokenizer_config.json");
/// Seed of the embedded default model.
pub const DEFAULT_SEED: u64 = 0;
/// Vocabulary of the embedded tokenizer.
pub const TOKENIZER_VOCAB: usize = 4096;

/// One named tensor of a generated checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Checkpoint name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// What [`init_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSummary {
    /// Scalars in the checkpoint.
    pub parameters: usize,
    /// Tensors in the checkpoint.
    pub tensors: usize,
    /// Whether the tokenizer files were written (the config's vocabulary must cover them).
    pub wrote_tokenizer: bool,
}

/// The embedded tiny config.
pub fn tiny_config() -> Result<ModelConfig> {
    ModelConfig::from_json_str(TINY_CONFIG_JSON, Path::new("config/models/tiny.json"))
}

struct Draw<'a> {
    seed: u64,
    out: &'a mut Vec<NamedTensor>,
}

impl Draw<'_> {
    fn normal(&mut self, name: String, shape: &[usize], std: f64, mean: f64) {
        let mut g = SplitMix64::for_stream(self.seed, &name);
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| (mean + std * g.normal()) as f32).collect();
        self.out.push(NamedTensor {
            name,
            shape: shape.to_vec(),
            data,
        });
    }
    fn matrix(&mut self, name: String, out_dim: usize, in_dim: usize) {
        self.normal(name, &[out_dim, in_dim], 1.0 / (in_dim as f64).sqrt(), 0.0);
    }
    fn norm(&mut self, name: String, dim: usize) {
        self.normal(name, &[dim], 0.1, 1.0);
    }
    fn bias(&mut self, name: String, dim: usize) {
        self.normal(name, &[dim], 0.02, 0.0);
    }
    fn mlp(&mut self, prefix: &str, hidden: usize, inter: usize) {
        self.matrix(format!("{prefix}.gate_proj.weight"), inter, hidden);
        self.matrix(format!("{prefix}.up_proj.weight"), inter, hidden);
        self.matrix(format!("{prefix}.down_proj.weight"), hidden, inter);
    }
}

/// Every tensor of a random checkpoint for `config`, drawn from `seed`.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<Vec<NamedTensor>> {
    config.validate()?;
    let c = config;
    let (v, h, heads) = (c.vocab_size, c.hidden_size, c.num_attention_heads);
    let (r, dr, dv, qk) = (
        c.kv_lora_rank,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.qk_head_dim(),
    );
    let mut out = Vec::new();
    let mut d = Draw {
        seed,
        out: &mut out,
    };
    d.normal("model.embed_tokens.weight".into(), &[v, h], 1.0, 0.0);
    d.norm("model.norm.weight".into(), h);
    if !c.tie_word_embeddings {
        d.normal(
            "lm_head.weight".into(),
            &[v, h],
            3.0 / (h as f64).sqrt(),
            0.0,
        );
    }
    for l in 0..c.total_layers() {
        let p = format!("model.layers.{l}");
        d.norm(format!("{p}.input_layernorm.weight"), h);
        d.norm(format!("{p}.post_attention_layernorm.weight"), h);
        let a = format!("{p}.self_attn");
        match c.q_lora_rank {
            Some(qr) => {
                d.matrix(format!("{a}.q_a_proj.weight"), qr, h);
                if c.attention_bias {
                    d.bias(format!("{a}.q_a_proj.bias"), qr);
                }
                d.norm(format!("{a}.q_a_layernorm.weight"), qr);
                d.matrix(format!("{a}.q_b_proj.weight"), heads * qk, qr);
            }
            None => {
                d.matrix(format!("{a}.q_proj.weight"), heads * qk, h);
                if c.attention_bias {
                    d.bias(format!("{a}.q_proj.bias"), heads * qk);
                }
            }
        }
        d.matrix(format!("{a}.kv_a_proj_with_mqa.weight"), r + dr, h);
        d.norm(format!("{a}.kv_a_layernorm.weight"), r);
        d.matrix(
            format!("{a}.kv_b_proj.weight"),
            heads * (c.qk_nope_head_dim + dv),
            r,
        );
        d.matrix(format!("{a}.o_proj.weight"), h, heads * dv);
        if c.attention_bias {
            d.bias(format!("{a}.kv_a_proj_with_mqa.bias"), r + dr);
            d.bias(format!("{a}.o_proj.bias"), h);
        }
        if c.is_moe_layer(l) {
            let moe = c.moe()?;
            d.matrix(format!("{p}.mlp.gate.weight"), moe.n_routed_experts, h);
            if moe.method == TopkMethod::NoauxTc {
                d.normal(
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                    &[moe.n_routed_experts],
                    0.05,
                    0.0,
                );
            }
            for e in 0..moe.n_routed_experts {
                d.mlp(&format!("{p}.mlp.experts.{e}"), h, moe.expert_intermediate);
            }
            if moe.shared_intermediate > 0 {
                d.mlp(
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    moe.shared_intermediate,
                );
            }
        } else {
            d.mlp(&format!("{p}.mlp"), h, c.intermediate_size);
        }
        if l >= c.num_hidden_layers {
            d.norm(format!("{p}.enorm.weight"), h);
            d.norm(format!("{p}.hnorm.weight"), h);
            d.matrix(format!("{p}.eh_proj.weight"), h, 2 * h);
            d.norm(format!("{p}.shared_head.norm.weight"), h);
        }
    }
    // As in DeepSeek's release, the MTP layer stores copies of the embedding and the head.
    for l in c.num_hidden_layers..c.total_layers() {
        let p = format!("model.layers.{l}");
        let copy = |from: &str, to: String, out: &Vec<NamedTensor>| {
            out.iter().find(|t| t.name == from).map(|t| NamedTensor {
                name: to,
                shape: t.shape.clone(),
                data: t.data.clone(),
            })
        };
        let head_src = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let extra: Vec<NamedTensor> = [
            copy(
                "model.embed_tokens.weight",
                format!("{p}.embed_tokens.weight"),
                &out,
            ),
            copy(head_src, format!("{p}.shared_head.head.weight"), &out),
        ]
        .into_iter()
        .flatten()
        .collect();
        out.extend(extra);
    }
    Ok(out)
}

/// Writes a complete checkpoint for the config text `config_json` (validated, written verbatim)
/// with weights drawn from `seed` into `out` (created if missing).
pub fn init_checkpoint(config_json: &str, seed: u64, out: &Path) -> Result<InitSummary> {
    let config = ModelConfig::from_json_str(config_json, &out.join("config.json"))?;
    let tensors = random_weights(&config, seed)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut w = SafetensorsWriter::new();
    for t in &tensors {
        w.add_f32(&t.name, &t.shape, &t.data)?;
    }
    w.write(&out.join(crate::checkpoint::SINGLE_FILE))?;
    write_file(&out.join("config.json"), config_json)?;
    let wrote_tokenizer = config.vocab_size >= TOKENIZER_VOCAB;
    if wrote_tokenizer {
        write_file(&out.join("tokenizer.json"), TOKENIZER_JSON)?;
        write_file(&out.join("tokenizer_config.json"), TOKENIZER_CONFIG_JSON)?;
    }
    Ok(InitSummary {
        parameters: tensors.iter().map(|t| t.data.len()).sum(),
        tensors: tensors.len(),
        wrote_tokenizer,
    })
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// The cache root: `$PDSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`.
pub fn default_cache_root() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("PDSERVE_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("pdserve"));
    }
    if let Some(home) = var("HOME") {
        return Ok(home.join(".cache").join("pdserve"));
    }
    Err(ModelError::Input(
        "no cache directory: set PDSERVE_CACHE_DIR (or XDG_CACHE_HOME or HOME)".into(),
    ))
}

/// The embedded tiny model's directory under `cache_root` (default: [`default_cache_root`]),
/// created on first use.
pub fn ensure_default(cache_root: Option<&Path>) -> Result<PathBuf> {
    let root = match cache_root {
        Some(r) => r.to_path_buf(),
        None => default_cache_root()?,
    };
    let models = root.join("models");
    let dir = models.join(format!("tiny-seed{DEFAULT_SEED}"));
    if dir.join("config.json").exists() && dir.join(crate::checkpoint::SINGLE_FILE).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&models).map_err(|e| ModelError::io(&models, e))?;
    let tmp = models.join(format!(
        ".tiny-seed{DEFAULT_SEED}.tmp-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    init_checkpoint(TINY_CONFIG_JSON, DEFAULT_SEED, &tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race: keep its copy.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(ModelError::io(&dir, e)),
    }
}
