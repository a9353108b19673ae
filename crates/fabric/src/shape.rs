//! The modeled model's shape: a serde mirror of the Hugging Face `config.json` fields that decide
//! bytes and FLOPs (unknown keys are ignored, as `config.json` files carry many).
//!
//! The fabric charges time at the *modeled* shape (by default DeepSeek-V3's `config.json`) while
//! the expert choices come from whatever model actually runs. Parameter counts here are per layer
//! and follow DeepSeek-V3's module layout (`q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`,
//! `kv_b_proj`, `o_proj`, gate, experts); for a model without `kv_lora_rank` (GQA) attention uses
//! the plain Q/K/V/O layout.
//!
//! Invariant: a `ModelShape` from this module's constructors is valid ([`ModelShape::validate`]).

use serde::{Deserialize, Serialize};

use crate::error::FabricError;
use crate::named;

/// Model configs shipped with pdserve: (name, `config.json` text).
const BUILTIN: &[(&str, &str)] = &[
    (
        "deepseek-v3",
        include_str!("../../../config/sim/models/deepseek-v3.json"),
    ),
    (
        "deepseek-v2-lite",
        include_str!("../../../config/sim/models/deepseek-v2-lite.json"),
    ),
    (
        "qwen2.5-72b",
        include_str!("../../../config/sim/models/qwen2.5-72b.json"),
    ),
    (
        "llama-3.1-405b",
        include_str!("../../../config/sim/models/llama-3.1-405b.json"),
    ),
];

/// Bytes of one BF16 element (KV cache, combine payload, core attention).
pub const BF16_BYTES: u64 = 2;
/// Bytes of one FP8 element (GEMM weights, dispatch payload).
pub const FP8_BYTES: u64 = 1;

/// The fields of a Hugging Face `config.json` that the cost model reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// `model_type` (informational).
    #[serde(default)]
    pub model_type: String,
    /// Vocabulary size (embedding and LM head rows).
    pub vocab_size: u64,
    /// Hidden size (`dim`).
    pub hidden_size: u64,
    /// Dense FFN intermediate size (the first `first_k_dense_replace` layers).
    pub intermediate_size: u64,
    /// Routed/shared expert intermediate size.
    #[serde(default)]
    pub moe_intermediate_size: u64,
    /// Decoder layers, without the MTP module.
    pub num_hidden_layers: u64,
    /// Leading dense layers; the rest are MoE when `n_routed_experts > 0`.
    #[serde(default)]
    pub first_k_dense_replace: u64,
    /// Query heads.
    pub num_attention_heads: u64,
    /// KV heads (GQA); MLA models set it equal to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<u64>,
    /// Head dimension for GQA models; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<u64>,
    /// MLA query compression rank; `null` means a plain query projection.
    #[serde(default)]
    pub q_lora_rank: Option<u64>,
    /// MLA KV compression rank (`c_kv` width); absent for GQA models.
    #[serde(default)]
    pub kv_lora_rank: Option<u64>,
    /// MLA non-RoPE query/key head dimension.
    #[serde(default)]
    pub qk_nope_head_dim: u64,
    /// MLA decoupled RoPE dimension (`k_rope` width).
    #[serde(default)]
    pub qk_rope_head_dim: u64,
    /// MLA value head dimension.
    #[serde(default)]
    pub v_head_dim: u64,
    /// Routed experts per MoE layer (0: dense model).
    #[serde(default)]
    pub n_routed_experts: u64,
    /// Shared experts per MoE layer.
    #[serde(default)]
    pub n_shared_experts: u64,
    /// Routed experts chosen per token.
    #[serde(default)]
    pub num_experts_per_tok: u64,
    /// Expert groups for group-limited routing.
    #[serde(default = "one")]
    pub n_group: u64,
    /// Groups a token may choose experts from.
    #[serde(default = "one")]
    pub topk_group: u64,
    /// MTP modules (0 or 1 for DeepSeek-V3).
    #[serde(default)]
    pub num_nextn_predict_layers: u64,
}

fn one() -> u64 {
    1
}

impl ModelShape {
    /// Names of the built-in shapes.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(name, _)| *name).collect()
    }

    /// DeepSeek-V3 (671B), the default modeled shape.
    pub fn deepseek_v3() -> Result<Self, FabricError> {
        Self::builtin("deepseek-v3")
    }

    /// A built-in shape by name.
    pub fn builtin(name: &str) -> Result<Self, FabricError> {
        Self::from_config_json(named::builtin_text("model shape", BUILTIN, name)?, name)
    }

    /// A built-in shape by name, or else the `config.json` at that path.
    pub fn load(name_or_path: &str) -> Result<Self, FabricError> {
        Self::from_config_json(
            &named::builtin_or_file("model shape", BUILTIN, name_or_path)?,
            name_or_path,
        )
    }

    /// Parses and validates a `config.json`; `origin` names it in errors.
    pub fn from_config_json(text: &str, origin: &str) -> Result<Self, FabricError> {
        let shape: Self = serde_json::from_str(text).map_err(|e| FabricError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        shape.validate(origin)?;
        Ok(shape)
    }

    /// Checks the fields the cost model divides by or iterates over.
    pub fn validate(&self, origin: &str) -> Result<(), FabricError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ] {
            if value == 0 {
                return Err(FabricError::invalid(
                    origin,
                    field,
                    "must be at least 1, got 0",
                ));
            }
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(FabricError::invalid(
                origin,
                "first_k_dense_replace",
                format!("exceeds num_hidden_layers ({})", self.num_hidden_layers),
            ));
        }
        if self.n_routed_experts > 0 {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(FabricError::invalid(
                    origin,
                    "num_experts_per_tok",
                    format!(
                        "must be in 1..={}, got {}",
                        self.n_routed_experts, self.num_experts_per_tok
                    ),
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(FabricError::invalid(
                    origin,
                    "moe_intermediate_size",
                    "must be at least 1",
                ));
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) || self.topk_group > self.n_group
            {
                return Err(FabricError::invalid(
                    origin,
                    "n_group",
                    format!(
                        "must divide n_routed_experts ({}) and be at least topk_group ({})",
                        self.n_routed_experts, self.topk_group
                    ),
                ));
            }
            if self.n_routed_experts > u64::from(u16::MAX) {
                return Err(FabricError::invalid(
                    origin,
                    "n_routed_experts",
                    "must be below 65536",
                ));
            }
        }
        if let Some(rank) = self.kv_lora_rank
            && (rank == 0
                || self.qk_nope_head_dim + self.qk_rope_head_dim == 0
                || self.v_head_dim == 0)
        {
            return Err(FabricError::invalid(
                origin,
                "kv_lora_rank",
                "an MLA model needs kv_lora_rank, qk_*_head_dim and v_head_dim above 0",
            ));
        }
        if self.kv_lora_rank.is_none() && self.gqa_head_dim() == 0 {
            return Err(FabricError::invalid(
                origin,
                "head_dim",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// True for MLA attention (a latent KV cache).
    pub fn is_mla(&self) -> bool {
        self.kv_lora_rank.is_some()
    }

    /// KV heads of a GQA model.
    pub fn kv_heads(&self) -> u64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head dimension of a GQA model.
    pub fn gqa_head_dim(&self) -> u64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Width of one token's cache entry per layer, in elements: `kv_lora_rank + qk_rope_head_dim`
    /// for MLA (`c_kv` and `k_rope`), `2 × kv_heads × head_dim` for GQA.
    pub fn kv_elements_per_token_per_layer(&self) -> u64 {
        match self.kv_lora_rank {
            Some(rank) => rank + self.qk_rope_head_dim,
            None => 2 * self.kv_heads() * self.gqa_head_dim(),
        }
    }

    /// KV cache bytes per token over the decoder layers (MTP excluded) in BF16: 70,272 for
    /// DeepSeek-V3, 327,680 for Qwen2.5-72B, 516,096 for Llama-3.1-405B, 31,104 for V2-Lite
    /// (ISCA '25 Table 1; deepseek-facts.md §1.1).
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.kv_elements_per_token_per_layer() * self.num_hidden_layers * BF16_BYTES
    }

    /// True when the model has routed experts.
    pub fn is_moe(&self) -> bool {
        self.n_routed_experts > 0
    }

    /// MoE layers of the main model (0 for a dense model).
    pub fn moe_layers(&self) -> u64 {
        if self.is_moe() {
            self.num_hidden_layers - self.first_k_dense_replace
        } else {
            0
        }
    }

    /// Dense layers of the main model.
    pub fn dense_layers(&self) -> u64 {
        self.num_hidden_layers - self.moe_layers()
    }

    /// Whether layer `layer` (0-based, main model) is dense.
    pub fn is_dense_layer(&self, layer: u64) -> bool {
        !self.is_moe() || layer < self.first_k_dense_replace
    }

    /// Parameters of one expert (gate, up and down projections): 44.04M for DeepSeek-V3.
    pub fn expert_params(&self) -> u64 {
        3 * self.hidden_size * self.moe_intermediate_size
    }

    /// Parameters of the dense FFN: 396.4M for DeepSeek-V3.
    pub fn dense_ffn_params(&self) -> u64 {
        3 * self.hidden_size * self.intermediate_size
    }

    /// Query head dimension of MLA (nope + rope).
    pub fn qk_head_dim(&self) -> u64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Attention parameters of one layer: 187.1M for DeepSeek-V3 (deepseek-facts.md §5.1 \[D\]).
    pub fn attention_params(&self) -> u64 {
        let h = self.hidden_size;
        let heads = self.num_attention_heads;
        match self.kv_lora_rank {
            Some(rank) => {
                let q = match self.q_lora_rank {
                    Some(qr) => h * qr + qr * heads * self.qk_head_dim(),
                    None => h * heads * self.qk_head_dim(),
                };
                q + h * (rank + self.qk_rope_head_dim)
                    + rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
                    + heads * self.v_head_dim * h
            }
            None => {
                let d = self.gqa_head_dim();
                h * heads * d + 2 * h * self.kv_heads() * d + heads * d * h
            }
        }
    }

    /// Embedding (= LM head) parameters: 0.927B for DeepSeek-V3.
    pub fn embedding_params(&self) -> u64 {
        self.vocab_size * self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_bytes_per_token_match_the_papers_table_1() {
        let kv = |name| ModelShape::builtin(name).unwrap().kv_bytes_per_token();
        assert_eq!(kv("deepseek-v3"), 70_272);
        assert_eq!(kv("qwen2.5-72b"), 327_680);
        assert_eq!(kv("llama-3.1-405b"), 516_096);
        assert_eq!(kv("deepseek-v2-lite"), 31_104);
    }

    #[test]
    fn deepseek_v3_parameter_counts_match_the_derived_facts() {
        let s = ModelShape::deepseek_v3().unwrap();
        assert_eq!(s.expert_params(), 44_040_192);
        assert_eq!(s.attention_params(), 187_105_280);
        assert_eq!(s.dense_ffn_params(), 396_361_728);
        assert_eq!(s.moe_layers(), 58);
        assert!(s.is_dense_layer(2) && !s.is_dense_layer(3));
    }

    #[test]
    fn zero_hidden_size_is_an_error_naming_the_field() {
        let text = include_str!("../../../config/sim/models/deepseek-v3.json")
            .replace("\"hidden_size\": 7168", "\"hidden_size\": 0");
        let err = ModelShape::from_config_json(&text, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg.json") && err.contains("hidden_size"),
            "{err}"
        );
    }

    #[test]
    fn unknown_shape_is_an_error() {
        assert!(ModelShape::load("gpt-9").is_err());
    }
}
