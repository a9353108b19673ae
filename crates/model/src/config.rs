//! A serde mirror of Hugging Face `config.json` for `deepseek_v3` (and DeepSeek-V2-style values).
//!
//! Field names and defaults follow the checkpoint's `config.json` and Hugging Face's
//! `DeepseekV3Config`. Keys pdserve does not use (training knobs such as `aux_loss_alpha`) are
//! ignored by serde; every key that changes the computation is either honoured or rejected by
//! [`ModelConfig::validate`] with an error naming the key — never silently ignored.
//!
//! Supported values:
//! - `scoring_func`: `sigmoid` (V3) or `softmax` (V2);
//! - `topk_method`: `noaux_tc` (V3: group score = sum of the top-2 biased scores, bias used for
//!   selection only), `group_limited_greedy` (V2: group score = max score), `greedy` (no groups);
//! - `q_lora_rank`: a rank (low-rank query) or `null` (plain `q_proj`, as V2-Lite);
//! - `rope_scaling`: `null` or YaRN (`type`/`rope_type` = `yarn`, with `mscale`, `mscale_all_dim`);
//!   Transformers 5's `rope_parameters` spelling is read too;
//! - `hidden_act`: `silu`; `quantization_config`: FP8 e4m3 with 128×128 blocks (dequantized at load).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `config.json` of a DeepSeek-V3 (or V2-style) checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `["DeepseekV3ForCausalLM"]`; informational.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// `deepseek_v3` or `deepseek_v2`; informational.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the dense MLP (first `first_k_dense_replace` layers).
    pub intermediate_size: usize,
    /// Width of one routed expert (and, times `n_shared_experts`, of the shared expert).
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Number of main decoder layers (the MTP layers follow at this index).
    pub num_hidden_layers: usize,
    /// Layers `0..first_k_dense_replace` use the dense MLP.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// A layer at or past `first_k_dense_replace` is MoE when `layer % moe_layer_freq == 0`.
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Must equal `num_attention_heads` (MLA has no grouped KV heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Rank of the query compression, or `null` for a plain `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rank of the KV compression (`c_kv` width).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with RoPE (the shared `k_rope` width).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Routed experts per MoE layer (`null` for a dense model).
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    /// Shared experts per MoE layer (fused into one MLP of `n × moe_intermediate_size`).
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Routed experts per token (top-k).
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Expert groups (nodes) for group-limited routing.
    #[serde(default)]
    pub n_group: Option<usize>,
    /// Groups a token may route to.
    #[serde(default)]
    pub topk_group: Option<usize>,
    /// `noaux_tc`, `group_limited_greedy` or `greedy`.
    #[serde(default = "default_topk_method")]
    pub topk_method: String,
    /// `sigmoid` or `softmax`.
    #[serde(default = "default_scoring_func")]
    pub scoring_func: String,
    /// Normalize the top-k weights to sum to one (before scaling).
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Multiplier of the routed experts' weights.
    #[serde(default = "one_f64")]
    pub routed_scaling_factor: f64,
    /// MTP depth (layers at index `num_hidden_layers..`); pdserve runs depth 0 or 1.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// Activation of the MLPs; only `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest position the RoPE tables cover.
    pub max_position_embeddings: usize,
    /// RoPE base (Transformers 5 moves it into `rope_parameters.rope_theta`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (YaRN) or `null`.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Transformers 5 spelling of `rope_theta` + `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    /// DeepSeek's interleaved RoPE pair layout (`true` for the released checkpoints).
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Biases on `q_a_proj`, `kv_a_proj_with_mqa`, `o_proj` (and `q_proj`).
    #[serde(default)]
    pub attention_bias: bool,
    /// `lm_head` shares `embed_tokens`' weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Informational dtype (`float32`, `bfloat16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// FP8 block quantization of the stored weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
}

/// One token id or a list (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` (or Transformers 5's `rope_parameters`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `yarn` (older spelling of `rope_type`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `yarn` or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Context extension factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// Pre-extension context length (the YaRN correction range is computed against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN fast boundary (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// YaRN slow boundary (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// mscale of the cos/sin tables (numerator of the attention factor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// mscale of the softmax scale (squared) and the attention factor's denominator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    /// Explicit cos/sin factor (overrides the mscale ratio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// RoPE base (Transformers 5's `rope_parameters` carries it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

/// `quantization_config` of DeepSeek's FP8 release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Must be `fp8`.
    pub quant_method: String,
    /// Must be `e4m3`.
    #[serde(default = "default_fmt")]
    pub fmt: String,
    /// `dynamic` (activations are not quantized by pdserve; computation is f32).
    #[serde(default)]
    pub activation_scheme: Option<String>,
    /// Block of one scale, `[rows, cols]`.
    #[serde(default = "default_block")]
    pub weight_block_size: Vec<usize>,
}

/// YaRN parameters resolved from `rope_scaling`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// Pre-extension context length.
    pub original_max_position_embeddings: usize,
    /// Fast boundary.
    pub beta_fast: f64,
    /// Slow boundary.
    pub beta_slow: f64,
    /// Multiplier of the cos/sin tables.
    pub attention_factor: f64,
    /// `mscale_all_dim` (0 when absent): the softmax scale gains `yarn_mscale(factor, m)²`.
    pub mscale_all_dim: f64,
}

/// RoPE resolved from `rope_theta`/`rope_scaling`/`rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    /// Base.
    pub theta: f64,
    /// YaRN, when configured.
    pub yarn: Option<Yarn>,
}

/// How router scores are computed from the gate's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    /// Per-expert sigmoid (V3).
    Sigmoid,
    /// Softmax over experts (V2).
    Softmax,
}

/// How the top-k experts are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: biased scores, group score = sum of the group's top-2, top `topk_group` groups.
    NoauxTc,
    /// V2: group score = the group's max score, top `topk_group` groups.
    GroupLimitedGreedy,
    /// Plain top-k over all experts.
    Greedy,
}

/// MoE shape resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeSpec {
    /// Routed experts.
    pub n_routed_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Groups.
    pub n_group: usize,
    /// Groups per token.
    pub topk_group: usize,
    /// Width of one routed expert.
    pub expert_intermediate: usize,
    /// Width of the fused shared expert (0 when none).
    pub shared_intermediate: usize,
    /// Scoring.
    pub scoring: ScoringFunc,
    /// Selection.
    pub method: TopkMethod,
    /// Normalize the top-k weights.
    pub norm_topk_prob: bool,
    /// Multiplier of the routed weights.
    pub routed_scaling_factor: f64,
}

fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_topk_method() -> String {
    "noaux_tc".to_string()
}
fn default_scoring_func() -> String {
    "sigmoid".to_string()
}
fn default_fmt() -> String {
    "e4m3".to_string()
}
fn default_block() -> Vec<usize> {
    vec![128, 128]
}

/// `0.1 · m · ln(s) + 1` for `s > 1`, else 1 (YaRN's magnitude correction).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates JSON text; `path` names the source in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate_at(path)?;
        Ok(config)
    }

    /// Checks every value pdserve depends on; the error names the key at fault.
    pub fn validate(&self) -> Result<()> {
        self.validate_at(Path::new("<config>"))
    }

    /// [`validate`](Self::validate) with `path` named in the error.
    pub fn validate_at(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: String| ModelError::config(path, key, message);
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(err(key, "must be positive".into()));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(err("q_lora_rank", "must be positive or null".into()));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(err(
                "qk_rope_head_dim",
                format!("must be even, got {}", self.qk_rope_head_dim),
            ));
        }
        if let Some(kv) = self.num_key_value_heads
            && kv != self.num_attention_heads
        {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "MLA needs it equal to num_attention_heads ({}), got {kv}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(err(
                "hidden_act",
                format!(
                    "unsupported value {:?} (supported: \"silu\")",
                    self.hidden_act
                ),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(err(
                "rms_norm_eps",
                format!("must be positive, got {}", self.rms_norm_eps),
            ));
        }
        if self.num_nextn_predict_layers > 1 {
            return Err(err(
                "num_nextn_predict_layers",
                format!(
                    "pdserve runs MTP depth 0 or 1, got {}",
                    self.num_nextn_predict_layers
                ),
            ));
        }
        if self
            .bos_token_id
            .is_some_and(|id| id as usize >= self.vocab_size)
        {
            return Err(err(
                "bos_token_id",
                format!("outside the vocabulary of {}", self.vocab_size),
            ));
        }
        if let Some(eos) = &self.eos_token_id
            && eos
                .to_vec()
                .iter()
                .any(|&id| id as usize >= self.vocab_size)
        {
            return Err(err(
                "eos_token_id",
                format!("outside the vocabulary of {}", self.vocab_size),
            ));
        }
        self.rope_at(path)?;
        if self.has_moe_layers() {
            self.moe_at(path)?;
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return Err(err(
                    "quantization_config.quant_method",
                    format!(
                        "unsupported value {:?} (supported: \"fp8\")",
                        q.quant_method
                    ),
                ));
            }
            if q.fmt != "e4m3" {
                return Err(err(
                    "quantization_config.fmt",
                    format!("unsupported value {:?} (supported: \"e4m3\")", q.fmt),
                ));
            }
            if q.weight_block_size.len() != 2 || q.weight_block_size.contains(&0) {
                return Err(err(
                    "quantization_config.weight_block_size",
                    format!("must be two positive sizes, got {:?}", q.weight_block_size),
                ));
            }
            if let Some(scheme) = &q.activation_scheme
                && scheme != "dynamic"
            {
                return Err(err(
                    "quantization_config.activation_scheme",
                    format!("unsupported value {scheme:?} (supported: \"dynamic\")"),
                ));
            }
        }
        Ok(())
    }

    /// Per-head query/key width (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `layer` (main layers and MTP layers alike) has an MoE block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts.is_some_and(|n| n > 0)
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    fn has_moe_layers(&self) -> bool {
        (0..self.num_hidden_layers + self.num_nextn_predict_layers).any(|l| self.is_moe_layer(l))
    }

    /// Layers in the checkpoint: main layers then MTP layers.
    pub fn total_layers(&self) -> usize {
        self.num_hidden_layers + self.num_nextn_predict_layers
    }

    /// End-of-sequence ids (empty when the config names none).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The resolved RoPE (errors name the key at fault).
    pub fn rope(&self) -> Result<RopeSpec> {
        self.rope_at(Path::new("<config>"))
    }

    fn rope_at(&self, path: &Path) -> Result<RopeSpec> {
        let err = |key: &str, message: String| ModelError::config(path, key, message);
        let (scaling, prefix) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(s), _) => (Some(s), "rope_scaling"),
            (None, Some(p)) => (Some(p), "rope_parameters"),
            (None, None) => (None, "rope_scaling"),
        };
        let theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        if !(theta > 1.0 && theta.is_finite()) {
            return Err(err(
                "rope_theta",
                format!("must be greater than 1, got {theta}"),
            ));
        }
        let Some(s) = scaling else {
            return Ok(RopeSpec { theta, yarn: None });
        };
        let kind = s
            .rope_type
            .as_deref()
            .or(s.kind.as_deref())
            .unwrap_or("default");
        match kind {
            "default" => Ok(RopeSpec { theta, yarn: None }),
            "yarn" => {
                let factor = s
                    .factor
                    .ok_or_else(|| err(&format!("{prefix}.factor"), "required for YaRN".into()))?;
                if !(factor >= 1.0 && factor.is_finite()) {
                    return Err(err(
                        &format!("{prefix}.factor"),
                        format!("must be at least 1, got {factor}"),
                    ));
                }
                let beta_fast = s.beta_fast.unwrap_or(32.0);
                let beta_slow = s.beta_slow.unwrap_or(1.0);
                if !(beta_fast > 0.0 && beta_slow > 0.0) {
                    return Err(err(
                        &format!("{prefix}.beta_fast"),
                        "beta_fast and beta_slow must be positive".into(),
                    ));
                }
                let mscale = s.mscale.unwrap_or(0.0);
                let mscale_all_dim = s.mscale_all_dim.unwrap_or(0.0);
                let attention_factor = match s.attention_factor {
                    Some(a) => a,
                    None if mscale != 0.0 && mscale_all_dim != 0.0 => {
                        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                    }
                    None => yarn_mscale(factor, 1.0),
                };
                Ok(RopeSpec {
                    theta,
                    yarn: Some(Yarn {
                        factor,
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(self.max_position_embeddings),
                        beta_fast,
                        beta_slow,
                        attention_factor,
                        mscale_all_dim,
                    }),
                })
            }
            other => Err(err(
                &format!("{prefix}.type"),
                format!("unsupported RoPE scaling {other:?} (supported: null, \"yarn\")"),
            )),
        }
    }

    /// Softmax scale of attention: `qk_head_dim^-0.5`, times `yarn_mscale(factor, mscale_all_dim)²`
    /// under YaRN with a nonzero `mscale_all_dim`.
    pub fn softmax_scale(&self) -> Result<f64> {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        Ok(match self.rope()?.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        })
    }

    /// The resolved MoE shape (errors name the key at fault).
    pub fn moe(&self) -> Result<MoeSpec> {
        self.moe_at(Path::new("<config>"))
    }

    fn moe_at(&self, path: &Path) -> Result<MoeSpec> {
        let err = |key: &str, message: String| ModelError::config(path, key, message);
        let need = |key: &str, v: Option<usize>| -> Result<usize> {
            match v {
                Some(x) if x > 0 => Ok(x),
                Some(_) => Err(err(key, "must be positive".into())),
                None => Err(err(key, "required by MoE layers".into())),
            }
        };
        let n_routed_experts = need("n_routed_experts", self.n_routed_experts)?;
        let top_k = need("num_experts_per_tok", self.num_experts_per_tok)?;
        let expert_intermediate = need("moe_intermediate_size", self.moe_intermediate_size)?;
        let scoring = match self.scoring_func.as_str() {
            "sigmoid" => ScoringFunc::Sigmoid,
            "softmax" => ScoringFunc::Softmax,
            other => {
                return Err(err(
                    "scoring_func",
                    format!("unsupported value {other:?} (supported: \"sigmoid\", \"softmax\")"),
                ));
            }
        };
        let method = match self.topk_method.as_str() {
            "noaux_tc" => TopkMethod::NoauxTc,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "greedy" => TopkMethod::Greedy,
            other => {
                return Err(err(
                    "topk_method",
                    format!(
                        "unsupported value {other:?} (supported: \"noaux_tc\", \"group_limited_greedy\", \"greedy\")"
                    ),
                ));
            }
        };
        let (n_group, topk_group) = match method {
            TopkMethod::Greedy => (1, 1),
            _ => (
                need("n_group", Some(self.n_group.unwrap_or(1)))?,
                need("topk_group", Some(self.topk_group.unwrap_or(1)))?,
            ),
        };
        if n_routed_experts % n_group != 0 {
            return Err(err(
                "n_group",
                format!("{n_group} groups do not divide n_routed_experts {n_routed_experts}"),
            ));
        }
        if topk_group > n_group {
            return Err(err(
                "topk_group",
                format!("{topk_group} exceeds n_group {n_group}"),
            ));
        }
        let per_group = n_routed_experts / n_group;
        if top_k > topk_group * per_group {
            return Err(err(
                "num_experts_per_tok",
                format!(
                    "{top_k} exceeds the {} experts of {topk_group} groups",
                    topk_group * per_group
                ),
            ));
        }
        if method == TopkMethod::NoauxTc && n_group > 1 && per_group < 2 {
            return Err(err(
                "n_group",
                "noaux_tc scores a group by its top 2 experts: need ≥2 per group".into(),
            ));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(err(
                "routed_scaling_factor",
                format!("must be positive, got {}", self.routed_scaling_factor),
            ));
        }
        Ok(MoeSpec {
            n_routed_experts,
            top_k,
            n_group,
            topk_group,
            expert_intermediate,
            shared_intermediate: expert_intermediate * self.n_shared_experts.unwrap_or(0),
            scoring,
            method,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor,
        })
    }

    /// Latent cache bytes per token at `bytes_per_element` (all main layers; the MTP layer not
    /// counted): `(kv_lora_rank + qk_rope_head_dim) × num_hidden_layers × bytes`.
    pub fn latent_cache_bytes_per_token(&self, bytes_per_element: usize) -> usize {
        (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * bytes_per_element
    }
}

/// The `config.json` path of a checkpoint directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
