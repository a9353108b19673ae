//! Multi-head Latent Attention (MLA) over a caller-owned latent cache.
//!
//! Projections (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1; names as in the checkpoint):
//! `q = q_b_proj(q_a_layernorm(q_a_proj(x)))` (or `q_proj(x)` when `q_lora_rank` is null),
//! split per head into `q_nope` (`qk_nope_head_dim`) and `q_rope` (`qk_rope_head_dim`);
//! `kv_a_proj_with_mqa(x)` = `[c_kv_raw | k_rope_raw]`, `c_kv = kv_a_layernorm(c_kv_raw)`,
//! `k_rope = RoPE(k_rope_raw)` (shared by all heads). Only `c_kv` and `k_rope` are cached.
//!
//! Two ways to attend, numerically equivalent (tests check both against each other and
//! against the reference):
//! - **plain** (prefill): expand the latent of every cached token with `kv_b_proj` into per-head
//!   `k_nope` and `v`, then ordinary attention. Cost grows with `len × kv_lora_rank × heads ×
//!   (nope + v)`, paid once per chunk — right for long chunks.
//! - **absorbed** (decode): fold `W_UK` (the key half of `kv_b_proj`) into the query,
//!   `q_lat = q_nope · W_UK` (`[heads, kv_lora_rank]`), score directly against the cache,
//!   `s = q_lat · c_kvᵀ + q_rope · k_ropeᵀ`, take `o_lat = softmax(s) · c_kv`, and apply `W_UV`
//!   (the value half) afterwards: `o = o_lat · W_UVᵀ`. Nothing per cached token is expanded.
//!   All absorbed sequences of a batch run together as one padded batched matmul.
//!
//! Causality: new token `i` of a sequence whose cache held `L₀` entries before this forward sees
//! cache entries `0..=L₀+i`. RoPE positions come from the caller (normally `L₀ + i`).

use candle_core::{DType, Device, Tensor};

use crate::cache::{LatentCache, SeqId};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, RmsNorm};
use crate::rope::Rope;

/// Which attention computation a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionPath {
    /// Absorbed for sequences with at most [`ABSORBED_MAX_NEW_TOKENS`] new tokens (decode,
    /// speculative verification), plain for longer chunks (prefill).
    #[default]
    Auto,
    /// Plain for every sequence.
    Plain,
    /// Absorbed for every sequence.
    Absorbed,
}

/// Longest chunk [`AttentionPath::Auto`] runs absorbed. Absorption costs
/// `new × (2·kv_lora_rank + rope)` per cached token and head against the plain path's
/// `kv_lora_rank × (nope + v)` per cached token: absorbed wins for chunks far longer than 8 at
/// DeepSeek-V3's shape, so 8 keeps decode and MTP verification absorbed.
pub const ABSORBED_MAX_NEW_TOKENS: usize = 8;

/// One sequence's slice of a flattened batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// Cache key.
    pub seq: SeqId,
    /// First row of the sequence in the flattened batch.
    pub offset: usize,
    /// New tokens.
    pub len: usize,
}

enum QueryProj {
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
    Full(Linear),
}

impl std::fmt::Debug for QueryProj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LowRank { .. } => f.write_str("QueryProj::LowRank"),
            Self::Full(_) => f.write_str("QueryProj::Full"),
        }
    }
}

/// Weights of one MLA block.
#[derive(Debug)]
pub struct Mla {
    q: QueryProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `kv_b_proj` transposed, `[kv_lora_rank, heads·(nope + v)]` (plain path).
    kv_b_t: Tensor,
    /// `W_UK`, `[heads, nope, kv_lora_rank]` (absorbed path).
    w_uk: Tensor,
    /// `W_UVᵀ`, `[heads, kv_lora_rank, v]` (absorbed path).
    w_uv_t: Tensor,
    o: Linear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    rank: usize,
    scale: f64,
}

/// Per-forward inputs shared by every layer's attention.
#[derive(Debug)]
pub struct AttentionBatch<'a> {
    /// Sequences of the batch.
    pub spans: &'a [SeqSpan],
    /// RoPE cos rows of every new token `[n, rope/2]`.
    pub cos: &'a Tensor,
    /// RoPE sin rows of every new token `[n, rope/2]`.
    pub sin: &'a Tensor,
    /// Path selection.
    pub path: AttentionPath,
}

impl Mla {
    /// Loads `{prefix}.*` (`prefix` = `model.layers.{l}.self_attn`).
    pub fn load(ckpt: &Checkpoint, prefix: &str, dev: &Device) -> Result<Self> {
        let c: &ModelConfig = ckpt.config();
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let (nope, rope_dim, v_dim, rank) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = c.qk_head_dim();
        let bias = c.attention_bias;
        let eps = c.rms_norm_eps;
        let q = match c.q_lora_rank {
            Some(qr) => QueryProj::LowRank {
                a: Linear::load(ckpt, &format!("{prefix}.q_a_proj"), qr, h, bias, dev)?,
                norm: RmsNorm::load(ckpt, &format!("{prefix}.q_a_layernorm"), qr, eps, dev)?,
                b: Linear::load(
                    ckpt,
                    &format!("{prefix}.q_b_proj"),
                    heads * qk,
                    qr,
                    false,
                    dev,
                )?,
            },
            None => QueryProj::Full(Linear::load(
                ckpt,
                &format!("{prefix}.q_proj"),
                heads * qk,
                h,
                bias,
                dev,
            )?),
        };
        let kv_a = Linear::load(
            ckpt,
            &format!("{prefix}.kv_a_proj_with_mqa"),
            rank + rope_dim,
            h,
            bias,
            dev,
        )?;
        let kv_norm = RmsNorm::load(ckpt, &format!("{prefix}.kv_a_layernorm"), rank, eps, dev)?;
        let kv_b = ckpt.load_f32(
            &format!("{prefix}.kv_b_proj.weight"),
            &[heads * (nope + v_dim), rank],
            dev,
        )?;
        let o = Linear::load(
            ckpt,
            &format!("{prefix}.o_proj"),
            h,
            heads * v_dim,
            bias,
            dev,
        )?;
        let per_head = kv_b.reshape((heads, nope + v_dim, rank))?;
        Ok(Self {
            q,
            kv_a,
            kv_norm,
            kv_b_t: kv_b.t()?.contiguous()?,
            w_uk: per_head.narrow(1, 0, nope)?.contiguous()?,
            w_uv_t: per_head
                .narrow(1, nope, v_dim)?
                .transpose(1, 2)?
                .contiguous()?,
            o,
            heads,
            nope,
            rope_dim,
            v_dim,
            rank,
            scale: c.softmax_scale()?,
        })
    }

    /// Attention output `[n, hidden]` of `x` `[n, hidden]` (already `input_layernorm`ed);
    /// appends the new tokens' latents to `cache` at `layer`.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &AttentionBatch<'_>,
        rope: &Rope,
        cache: &mut dyn LatentCache,
        layer: usize,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let q = match &self.q {
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
            QueryProj::Full(p) => p.forward(x)?,
        };
        let q = q.reshape((n, self.heads, self.nope + self.rope_dim))?;
        let q_nope = q.narrow(2, 0, self.nope)?;
        let q_rope = rope.apply(
            &q.narrow(2, self.nope, self.rope_dim)?,
            batch.cos,
            batch.sin,
        )?;
        let kv = self.kv_a.forward(x)?;
        let c_kv = self.kv_norm.forward(&kv.narrow(1, 0, self.rank)?)?;
        let k_rope = rope.apply(
            &kv.narrow(1, self.rank, self.rope_dim)?.contiguous()?,
            batch.cos,
            batch.sin,
        )?;

        // Append the new latents (one host copy per layer, then plain slices per sequence).
        let c_host: Vec<f32> = c_kv.flatten_all()?.to_vec1()?;
        let k_host: Vec<f32> = k_rope.flatten_all()?.to_vec1()?;
        let mut prior = Vec::with_capacity(batch.spans.len());
        for s in batch.spans {
            prior.push(cache.len(s.seq, layer));
            cache.append_rows(
                s.seq,
                layer,
                s.len,
                &c_host[s.offset * self.rank..(s.offset + s.len) * self.rank],
                &k_host[s.offset * self.rope_dim..(s.offset + s.len) * self.rope_dim],
            )?;
        }
        let absorbed = |s: &SeqSpan| match batch.path {
            AttentionPath::Auto => s.len <= ABSORBED_MAX_NEW_TOKENS,
            AttentionPath::Plain => false,
            AttentionPath::Absorbed => true,
        };
        let abs_idx: Vec<usize> = (0..batch.spans.len())
            .filter(|&i| absorbed(&batch.spans[i]))
            .collect();
        let plain_idx: Vec<usize> = (0..batch.spans.len())
            .filter(|&i| !absorbed(&batch.spans[i]))
            .collect();

        // Outputs in span order of each group, then reassembled in token order.
        let mut pieces: Vec<(usize, Tensor)> = Vec::new();
        if !abs_idx.is_empty() {
            let group = AbsorbedGroup {
                spans: batch.spans,
                idx: &abs_idx,
                prior: &prior,
            };
            let out = self.absorbed(&q_nope, &q_rope, &group, cache, layer)?;
            let mut row = 0;
            for &i in &abs_idx {
                let s = &batch.spans[i];
                pieces.push((s.offset, out.narrow(0, row, s.len)?));
                row += s.len;
            }
        }
        for &i in &plain_idx {
            let s = &batch.spans[i];
            let (c_all, k_all) = self.read_latents(&*cache, s, layer, prior[i], x.device())?;
            let out = self.plain(
                &q_nope.narrow(0, s.offset, s.len)?,
                &q_rope.narrow(0, s.offset, s.len)?,
                &c_all,
                &k_all,
                prior[i],
            )?;
            pieces.push((s.offset, out));
        }
        pieces.sort_by_key(|(offset, _)| *offset);
        let parts: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
        let attn = if parts.len() == 1 {
            parts
                .into_iter()
                .next()
                .ok_or_else(|| ModelError::Input("empty batch".into()))?
        } else {
            Tensor::cat(&parts, 0)?
        };
        self.o.forward(&attn)
    }

    /// Reads `len` entries of `(span.seq, layer)` into the host buffers.
    fn read_host(
        &self,
        cache: &dyn LatentCache,
        span: &SeqSpan,
        layer: usize,
        len: usize,
        c_buf: &mut Vec<f32>,
        k_buf: &mut Vec<f32>,
    ) -> Result<()> {
        let held = cache.len(span.seq, layer);
        if held != len {
            return Err(ModelError::Cache(format!(
                "sequence {} layer {layer}: cache holds {held} entries, {len} expected after appending {}",
                span.seq, span.len
            )));
        }
        c_buf.resize(len * self.rank, 0.0);
        k_buf.resize(len * self.rope_dim, 0.0);
        cache.read_into(span.seq, layer, c_buf, k_buf)
    }

    /// Every cached entry of one sequence as tensors `[len, rank]`, `[len, rope]`.
    fn read_latents(
        &self,
        cache: &dyn LatentCache,
        span: &SeqSpan,
        layer: usize,
        prior: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let len = prior + span.len;
        let (mut c, mut k) = (Vec::new(), Vec::new());
        self.read_host(cache, span, layer, len, &mut c, &mut k)?;
        Ok((
            Tensor::from_vec(c, (len, self.rank), dev)?,
            Tensor::from_vec(k, (len, self.rope_dim), dev)?,
        ))
    }

    /// Plain attention of one sequence: `q_*` `[n, heads, *]`, cache `[len, *]` → `[n, heads·v]`.
    fn plain(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        c_all: &Tensor,
        k_all: &Tensor,
        prior: usize,
    ) -> Result<Tensor> {
        let n = q_nope.dim(0)?;
        let len = c_all.dim(0)?;
        let kv = c_all
            .matmul(&self.kv_b_t)?
            .reshape((len, self.heads, self.nope + self.v_dim))?;
        let k_nope_t = kv
            .narrow(2, 0, self.nope)?
            .permute((1, 2, 0))?
            .contiguous()?; // [H, nope, len]
        let v = kv
            .narrow(2, self.nope, self.v_dim)?
            .transpose(0, 1)?
            .contiguous()?; // [H, len, v]
        let qn = q_nope.transpose(0, 1)?.contiguous()?; // [H, n, nope]
        let s_nope = qn.matmul(&k_nope_t)?; // [H, n, len]
        let k_rope_t = k_all.t()?.contiguous()?; // [rope, len]
        let s_rope = q_rope
            .reshape((n * self.heads, self.rope_dim))?
            .matmul(&k_rope_t)?
            .reshape((n, self.heads, len))?
            .transpose(0, 1)?;
        let scores = ((s_nope + s_rope)? * self.scale)?;
        let mask = causal_mask(&[(n, prior)], n, len, q_nope.device())?.reshape((1, n, len))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?.contiguous()?)?;
        let out = probs.matmul(&v)?; // [H, n, v]
        Ok(out.transpose(0, 1)?.reshape((n, self.heads * self.v_dim))?)
    }

    /// Absorbed attention of the spans `idx`, batched with padding; returns `[Σ len, heads·v]`
    /// in the order of `idx`.
    fn absorbed(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        group: &AbsorbedGroup<'_>,
        cache: &dyn LatentCache,
        layer: usize,
    ) -> Result<Tensor> {
        let AbsorbedGroup { spans, idx, prior } = *group;
        let dev = q_nope.device();
        let n_total = q_nope.dim(0)?;
        let heads = self.heads;
        let width = self.rank + self.rope_dim;
        let b = idx.len();
        let nmax = idx.iter().map(|&i| spans[i].len).max().unwrap_or(0);
        let rows: Vec<u32> = idx
            .iter()
            .flat_map(|&i| (spans[i].offset..spans[i].offset + spans[i].len).map(|r| r as u32))
            .collect();
        let m = rows.len();
        let (qn, qr) = if m == n_total && rows.iter().enumerate().all(|(i, &r)| i as u32 == r) {
            (q_nope.clone(), q_rope.clone())
        } else {
            let r = Tensor::from_slice(&rows, m, dev)?;
            (
                q_nope.contiguous()?.index_select(&r, 0)?,
                q_rope.contiguous()?.index_select(&r, 0)?,
            )
        };
        // q_lat = q_nope · W_UK per head: [H, m, nope] · [H, nope, rank] → [m, H, rank].
        let q_lat = qn
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uk)?
            .transpose(0, 1)?;
        let q_cat = Tensor::cat(&[q_lat, qr], 2)?; // [m, H, rank + rope]
        // Pad queries to [b, nmax·H, width].
        let q_pad = if nmax == 1 {
            q_cat.reshape((b, heads, width))?
        } else {
            let mut gather = Vec::with_capacity(b * nmax);
            let mut row = 0u32;
            for &i in idx {
                let len = spans[i].len;
                for j in 0..nmax {
                    gather.push(if j < len { row + j as u32 } else { m as u32 });
                }
                row += len as u32;
            }
            let padded = Tensor::cat(
                &[
                    q_cat.reshape((m, heads * width))?,
                    Tensor::zeros((1, heads * width), DType::F32, dev)?,
                ],
                0,
            )?;
            padded
                .index_select(&Tensor::from_vec(gather, b * nmax, dev)?, 0)?
                .reshape((b, nmax * heads, width))?
        };
        // Latent cache of each sequence, padded to [b, lmax, rank + rope], built on the host.
        let lens: Vec<usize> = idx.iter().map(|&i| prior[i] + spans[i].len).collect();
        let lmax = lens.iter().copied().max().unwrap_or(0);
        let mut kv_host = vec![0f32; b * lmax * width];
        let (mut c_buf, mut k_buf) = (Vec::new(), Vec::new());
        for (slot, (&i, &len)) in idx.iter().zip(&lens).enumerate() {
            self.read_host(cache, &spans[i], layer, len, &mut c_buf, &mut k_buf)?;
            let base = slot * lmax * width;
            for j in 0..len {
                let row = &mut kv_host[base + j * width..base + (j + 1) * width];
                row[..self.rank].copy_from_slice(&c_buf[j * self.rank..(j + 1) * self.rank]);
                row[self.rank..]
                    .copy_from_slice(&k_buf[j * self.rope_dim..(j + 1) * self.rope_dim]);
            }
        }
        let kv = Tensor::from_vec(kv_host, (b, lmax, width), dev)?;
        // Scores as kv · q_padᵀ (the small q side is the transposed operand), then [b, q, lmax].
        let scores = (kv.matmul(&q_pad.transpose(1, 2)?)?.transpose(1, 2)? * self.scale)?
            .reshape((b, nmax, heads, lmax))?;
        let shape: Vec<(usize, usize)> = idx.iter().map(|&i| (spans[i].len, prior[i])).collect();
        let mask = causal_mask(&shape, nmax, lmax, dev)?.reshape((b, nmax, 1, lmax))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?.reshape((
            b,
            nmax * heads,
            lmax,
        ))?;
        let o_lat = probs.matmul(&kv.narrow(2, 0, self.rank)?)?; // [b, nmax·H, rank]
        let o_lat = if nmax == 1 {
            o_lat.reshape((b, heads, self.rank))?
        } else {
            let mut keep = Vec::with_capacity(m);
            for (k, &i) in idx.iter().enumerate() {
                for j in 0..spans[i].len {
                    keep.push((k * nmax + j) as u32);
                }
            }
            o_lat
                .reshape((b * nmax, heads, self.rank))?
                .index_select(&Tensor::from_vec(keep, m, dev)?, 0)?
        };
        // o = o_lat · W_UVᵀ per head: [H, m, rank] · [H, rank, v] → [m, H·v].
        let out = o_lat.transpose(0, 1)?.contiguous()?.matmul(&self.w_uv_t)?;
        Ok(out.transpose(0, 1)?.reshape((m, heads * self.v_dim))?)
    }
}

/// The sequences of a batch that take the absorbed path.
#[derive(Debug, Clone, Copy)]
struct AbsorbedGroup<'a> {
    /// All spans of the batch.
    spans: &'a [SeqSpan],
    /// Indices (into `spans`) of the absorbed ones.
    idx: &'a [usize],
    /// Cache length of every span before this forward's append.
    prior: &'a [usize],
}

/// Additive causal mask `[seqs, nmax, lmax]`: entry `(s, i, j)` is 0 when key `j` is visible to
/// new token `i` of sequence `s` (`j ≤ prior + i`), −∞ otherwise; padded queries (`i ≥ new`) see
/// key 0 only so their softmax stays finite.
fn causal_mask(seqs: &[(usize, usize)], nmax: usize, lmax: usize, dev: &Device) -> Result<Tensor> {
    let mut mask = vec![f32::NEG_INFINITY; seqs.len() * nmax * lmax];
    for (s, &(new, prior)) in seqs.iter().enumerate() {
        for i in 0..nmax {
            let visible = if i < new {
                (prior + i + 1).min(lmax)
            } else {
                1
            };
            let row = &mut mask[(s * nmax + i) * lmax..][..lmax];
            row[..visible].fill(0.0);
        }
    }
    Ok(Tensor::from_vec(mask, (seqs.len(), nmax, lmax), dev)?)
}
