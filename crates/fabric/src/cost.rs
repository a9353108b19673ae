//! Compute cost of each pipeline stage at the modeled shape, from FLOPs and bytes against the
//! profile's roofline.
//!
//! A stage is a few kernels; each kernel group is charged `max(FLOPs / achievable FLOP/s,
//! bytes / achievable HBM bytes/s)` and the groups add up, plus the profile's
//! `efficiency.stage_overhead_us`. Achievable rates are the profile's peaks times its named
//! efficiency factors (`gemm_fp8`, `attention_bf16`, `memory`), and FLOP/s are further scaled by
//! the share of SMs left to compute in the phase (`prefill_comm_sms`, `decode_comm_sms`).
//!
//! Precision follows DeepSeek's serving (deepseek-facts.md §3, "Precision in serving"): all
//! GEMMs, including the LM head, in FP8 (1 byte per weight); core MLA and the latent KV cache in
//! BF16 (2 bytes). Decode uses weight absorption (attention runs on the 576-wide latent cache,
//! MQA mode); prefill up-projects the latent cache (`kv_b_proj`) and attends with 192/128-wide
//! heads. GQA shapes (no `kv_lora_rank`) use plain Q/K/V/O projections.
//!
//! Stages (DeepSeek's names, DAY6): decode ATTN-0 = MLA down/up projections and `W_UK`
//! absorption; ATTN-1 = core attention, `W_UV`, output projection and the routing gate; prefill
//! ATTN = all of those; SHARED = shared experts; MLP = the routed experts a GPU hosts; dense FFN;
//! HEAD = final norm and LM head; the MTP module adds `eh_proj` before its block.

use serde::Serialize;

use crate::batch::{AttentionLoad, Phase};
use crate::profile::HardwareProfile;
use crate::shape::{BF16_BYTES, FP8_BYTES, ModelShape};

/// FLOPs and bytes of one kernel group.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Roofline {
    /// Floating-point operations.
    pub flops: f64,
    /// HBM bytes moved.
    pub bytes: f64,
}

/// The work of one stage: FP8 GEMMs and BF16 core attention.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct StageCost {
    /// GEMMs (FP8 tensor cores).
    pub gemm: Roofline,
    /// Core attention (BF16 tensor cores).
    pub attention: Roofline,
}

impl StageCost {
    fn add_gemm(&mut self, tokens: f64, params: f64, in_dim: f64, out_dim: f64) {
        self.gemm.flops += 2.0 * tokens * params;
        self.gemm.bytes +=
            params * FP8_BYTES as f64 + tokens * (in_dim + out_dim) * BF16_BYTES as f64;
    }
}

/// Prices stages for one hardware profile and modeled shape.
#[derive(Debug, Clone)]
pub struct CostModel {
    shape: ModelShape,
    fp8_flops_per_us: f64,
    bf16_flops_per_us: f64,
    hbm_bytes_per_us: f64,
    overhead_us: f64,
    prefill_sm_share: f64,
    decode_sm_share: f64,
}

impl CostModel {
    /// The cost model of `shape` on `profile` (both already valid).
    pub fn new(profile: &HardwareProfile, shape: &ModelShape) -> Self {
        let e = &profile.efficiency;
        let sms = f64::from(profile.gpu.sm_count);
        Self {
            shape: shape.clone(),
            fp8_flops_per_us: profile.gpu.fp8_flops_per_s * e.gemm_fp8 / 1e6,
            bf16_flops_per_us: profile.gpu.bf16_flops_per_s * e.attention_bf16 / 1e6,
            hbm_bytes_per_us: profile.gpu.hbm_bytes_per_s * e.memory / 1e6,
            overhead_us: e.stage_overhead_us,
            prefill_sm_share: (sms - f64::from(e.prefill_comm_sms)) / sms,
            decode_sm_share: (sms - f64::from(e.decode_comm_sms)) / sms,
        }
    }

    /// The modeled shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Time of a stage in `phase`, µs; an empty stage costs nothing (no overhead either).
    pub fn time_us(&self, cost: &StageCost, phase: Phase) -> f64 {
        if cost.gemm.flops == 0.0 && cost.attention.flops == 0.0 && cost.gemm.bytes == 0.0 {
            return 0.0;
        }
        let share = match phase {
            Phase::Prefill => self.prefill_sm_share,
            Phase::Decode => self.decode_sm_share,
        };
        let gemm = (cost.gemm.flops / (self.fp8_flops_per_us * share))
            .max(cost.gemm.bytes / self.hbm_bytes_per_us);
        let attn = (cost.attention.flops / (self.bf16_flops_per_us * share))
            .max(cost.attention.bytes / self.hbm_bytes_per_us);
        gemm + attn + self.overhead_us
    }

    /// Decode ATTN-0: query and KV down/up projections and `W_UK` absorption.
    pub fn decode_attn0(&self, load: &AttentionLoad) -> StageCost {
        let s = &self.shape;
        let n = load.tokens as f64;
        let mut c = StageCost::default();
        if n == 0.0 {
            return c;
        }
        let (h, heads) = (s.hidden_size as f64, s.num_attention_heads as f64);
        match s.kv_lora_rank {
            Some(rank) => {
                let rank = rank as f64;
                let qk = s.qk_head_dim() as f64;
                match s.q_lora_rank {
                    Some(qr) => {
                        let qr = qr as f64;
                        c.add_gemm(n, h * qr, h, qr);
                        c.add_gemm(n, qr * heads * qk, qr, heads * qk);
                    }
                    None => c.add_gemm(n, h * heads * qk, h, heads * qk),
                }
                let rope = s.qk_rope_head_dim as f64;
                c.add_gemm(n, h * (rank + rope), h, rank + rope);
                let nope = s.qk_nope_head_dim as f64;
                c.add_gemm(n, heads * nope * rank, heads * nope, heads * rank);
            }
            None => {
                let d = s.gqa_head_dim() as f64;
                let kv = s.kv_heads() as f64;
                c.add_gemm(n, h * (heads + 2.0 * kv) * d, h, (heads + 2.0 * kv) * d);
            }
        }
        c
    }

    /// Decode ATTN-1: core attention over the cache, `W_UV`, output projection, routing gate.
    pub fn decode_attn1(&self, load: &AttentionLoad) -> StageCost {
        let s = &self.shape;
        let n = load.tokens as f64;
        let mut c = StageCost::default();
        if n == 0.0 {
            return c;
        }
        let (h, heads) = (s.hidden_size as f64, s.num_attention_heads as f64);
        let keys = load.attended_keys as f64;
        let entries = load.kv_entries_read as f64;
        let bf16 = BF16_BYTES as f64;
        match s.kv_lora_rank {
            Some(rank) => {
                let rank = rank as f64;
                let width = rank + s.qk_rope_head_dim as f64;
                // MQA over the latent cache: scores over `width`, values over `rank`.
                c.attention.flops = 2.0 * heads * (width + rank) * keys;
                c.attention.bytes = entries * width * bf16 + n * heads * (width + rank) * bf16;
                let v = s.v_head_dim as f64;
                c.add_gemm(n, heads * rank * v, heads * rank, heads * v);
                c.add_gemm(n, heads * v * h, heads * v, h);
            }
            None => {
                let d = s.gqa_head_dim() as f64;
                let kv = s.kv_heads() as f64;
                c.attention.flops = 2.0 * heads * 2.0 * d * keys;
                c.attention.bytes = entries * 2.0 * kv * d * bf16 + n * 2.0 * heads * d * bf16;
                c.add_gemm(n, heads * d * h, heads * d, h);
            }
        }
        self.add_gate(&mut c, n);
        c
    }

    /// Prefill ATTN: projections, latent up-projection of the context, causal attention, output
    /// projection and routing gate.
    pub fn prefill_attn(&self, load: &AttentionLoad) -> StageCost {
        let s = &self.shape;
        let n = load.tokens as f64;
        let mut c = StageCost::default();
        if n == 0.0 {
            return c;
        }
        let (h, heads) = (s.hidden_size as f64, s.num_attention_heads as f64);
        let keys = load.attended_keys as f64;
        let entries = load.kv_entries_read as f64;
        let bf16 = BF16_BYTES as f64;
        match s.kv_lora_rank {
            Some(rank) => {
                let rank = rank as f64;
                let (qk, v) = (s.qk_head_dim() as f64, s.v_head_dim as f64);
                let nope = s.qk_nope_head_dim as f64;
                let rope = s.qk_rope_head_dim as f64;
                match s.q_lora_rank {
                    Some(qr) => {
                        let qr = qr as f64;
                        c.add_gemm(n, h * qr, h, qr);
                        c.add_gemm(n, qr * heads * qk, qr, heads * qk);
                    }
                    None => c.add_gemm(n, h * heads * qk, h, heads * qk),
                }
                c.add_gemm(n, h * (rank + rope), h, rank + rope);
                // kv_b_proj over every context entry the chunk attends to.
                c.add_gemm(entries, rank * heads * (nope + v), rank, heads * (nope + v));
                c.attention.flops = 2.0 * heads * (qk + v) * keys;
                c.attention.bytes = entries * heads * (qk + v) * bf16 + n * heads * (qk + v) * bf16;
                c.add_gemm(n, heads * v * h, heads * v, h);
            }
            None => {
                let d = s.gqa_head_dim() as f64;
                let kv = s.kv_heads() as f64;
                c.add_gemm(n, h * (heads + 2.0 * kv) * d, h, (heads + 2.0 * kv) * d);
                c.attention.flops = 2.0 * heads * 2.0 * d * keys;
                c.attention.bytes = entries * 2.0 * kv * d * bf16 + n * 2.0 * heads * d * bf16;
                c.add_gemm(n, heads * d * h, heads * d, h);
            }
        }
        self.add_gate(&mut c, n);
        c
    }

    fn add_gate(&self, c: &mut StageCost, n: f64) {
        if self.shape.is_moe() {
            let h = self.shape.hidden_size as f64;
            let e = self.shape.n_routed_experts as f64;
            c.add_gemm(n, h * e, h, e);
        }
    }

    /// SHARED: the shared experts on `tokens` tokens.
    pub fn shared_experts(&self, tokens: u64) -> StageCost {
        let mut c = StageCost::default();
        let s = &self.shape;
        if tokens == 0 || s.n_shared_experts == 0 {
            return c;
        }
        let h = s.hidden_size as f64;
        let params = (s.n_shared_experts * s.expert_params()) as f64;
        c.add_gemm(tokens as f64, params, h, h);
        c
    }

    /// MLP: routed experts on one GPU, `pairs` (token, expert) pairs over `active_experts`
    /// distinct local experts (each active expert's weights are read once).
    pub fn routed_experts(&self, pairs: u64, active_experts: u64) -> StageCost {
        let mut c = StageCost::default();
        if pairs == 0 {
            return c;
        }
        let s = &self.shape;
        let h = s.hidden_size as f64;
        let params = s.expert_params() as f64;
        let p = pairs as f64;
        c.gemm.flops = 2.0 * p * params;
        c.gemm.bytes = active_experts as f64 * params * FP8_BYTES as f64
            + p * h * (FP8_BYTES + BF16_BYTES) as f64;
        c
    }

    /// Dense FFN of a dense layer on `tokens` tokens.
    pub fn dense_ffn(&self, tokens: u64) -> StageCost {
        let mut c = StageCost::default();
        if tokens == 0 {
            return c;
        }
        let h = self.shape.hidden_size as f64;
        c.add_gemm(tokens as f64, self.shape.dense_ffn_params() as f64, h, h);
        c
    }

    /// HEAD: final norm and LM head on `tokens` tokens.
    pub fn lm_head(&self, tokens: u64) -> StageCost {
        let mut c = StageCost::default();
        if tokens == 0 {
            return c;
        }
        let s = &self.shape;
        c.add_gemm(
            tokens as f64,
            s.embedding_params() as f64,
            s.hidden_size as f64,
            s.vocab_size as f64,
        );
        c
    }

    /// The MTP module's input: embedding gather and `eh_proj` (2·hidden → hidden).
    pub fn mtp_projection(&self, tokens: u64) -> StageCost {
        let mut c = StageCost::default();
        if tokens == 0 {
            return c;
        }
        let h = self.shape.hidden_size as f64;
        c.add_gemm(tokens as f64, 2.0 * h * h, 2.0 * h, h);
        c
    }

    /// Bytes of weights one GPU holds: attention, dense FFNs, shared experts, `slots` routed
    /// expert copies per MoE layer, embedding and LM head (and the MTP block when `mtp`).
    pub fn weight_bytes_per_gpu(&self, slots: u32, mtp: bool) -> f64 {
        let s = &self.shape;
        let layers = s.num_hidden_layers as f64 + if mtp { 1.0 } else { 0.0 };
        let moe_layers = s.moe_layers() as f64 + if mtp && s.is_moe() { 1.0 } else { 0.0 };
        let per_moe = (s.n_shared_experts as f64 + f64::from(slots)) * s.expert_params() as f64
            + (s.hidden_size * s.n_routed_experts) as f64;
        let fp8 = layers * s.attention_params() as f64
            + s.dense_layers() as f64 * s.dense_ffn_params() as f64
            + moe_layers * per_moe
            + if mtp {
                2.0 * (s.hidden_size * s.hidden_size) as f64
            } else {
                0.0
            };
        fp8 * FP8_BYTES as f64 + 2.0 * s.embedding_params() as f64 * BF16_BYTES as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> CostModel {
        CostModel::new(
            &HardwareProfile::builtin("h800").unwrap(),
            &ModelShape::deepseek_v3().unwrap(),
        )
    }

    #[test]
    fn decode_attention_is_memory_bound_on_the_latent_cache() {
        let m = model();
        let load = AttentionLoad {
            tokens: 32,
            attended_keys: 32 * 4096,
            kv_entries_read: 32 * 4096,
        };
        let c = m.decode_attn1(&load);
        // 32 × 4096 entries × 576 × 2 B = 151 MB of latent cache read, plus the absorbed queries
        // and outputs (32 × 128 × 1088 × 2 B = 8.9 MB).
        let cache = 32.0 * 4096.0 * 576.0 * 2.0;
        assert_eq!(c.attention.bytes, cache + 32.0 * 128.0 * 1088.0 * 2.0);
        // Attention FLOPs per token per layer ≈ 128 × 1088 × 2 × L (deepseek-facts.md §5.1 [D]).
        assert_eq!(c.attention.flops, 2.0 * 128.0 * 1088.0 * 32.0 * 4096.0);
    }

    #[test]
    fn more_tokens_never_cost_less() {
        let m = model();
        let mut last = 0.0;
        for t in [1u64, 8, 32, 128, 1024] {
            let load = AttentionLoad {
                tokens: t,
                attended_keys: t * 2000,
                kv_entries_read: t * 2000,
            };
            let time = m.time_us(&m.decode_attn1(&load), Phase::Decode)
                + m.time_us(&m.routed_experts(t * 8, 8), Phase::Decode);
            assert!(time >= last);
            last = time;
        }
    }

    #[test]
    fn a_small_routed_batch_is_bound_by_reading_the_expert_weights() {
        let m = model();
        // Two 44 MB experts at 3.35 TB/s × 0.896 ≈ 29.3 µs.
        let t = m.time_us(&m.routed_experts(64, 2), Phase::Decode);
        let expect = 2.0 * 44_040_192.0 / (3.35e6 * 0.896) + 64.0 * 7168.0 * 3.0 / (3.35e6 * 0.896);
        assert!((t - expect).abs() < 1e-9, "{t} vs {expect}");
    }

    #[test]
    fn deepseek_v3_does_not_fit_on_one_h800_node_but_fits_on_two() {
        let m = model();
        assert!(m.weight_bytes_per_gpu(32, false) > 80e9);
        assert!(m.weight_bytes_per_gpu(16, false) < 80e9);
    }
}
