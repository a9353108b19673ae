//! Decoupled RoPE of MLA: tables (plain or YaRN) and their application.
//!
//! Layouts. With `rope_interleave: true` (DeepSeek's release) the rotated pairs of a
//! `qk_rope_head_dim` vector are `(x[2i], x[2i+1])`; otherwise `(x[i], x[i + d/2])`. Either way
//! pdserve first brings the vector into the "halves" layout (`[x_even…, x_odd…]` for the
//! interleaved case), then rotates pair `i` by `position × inv_freq[i]`, and keeps the result in the
//! halves layout. This is exactly what Hugging Face transformers computes
//! (`apply_rotary_pos_emb_interleave` de-interleaves, then applies `rotate_half`), and since
//! queries and keys are permuted alike, `q·k` equals DeepSeek's complex-number rotation of the
//! interleaved pairs. The latent cache therefore stores `k_rope` rotated, in the halves layout.
//!
//! YaRN follows transformers' `_compute_yarn_parameters` (and DeepSeek's reference): frequencies
//! blended between `inv_freq` and `inv_freq / factor` by a linear ramp over the correction range
//! computed against `original_max_position_embeddings`, and cos/sin multiplied by the attention
//! factor (`yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`).

use candle_core::{D, Device, Tensor};

use crate::config::RopeSpec;
use crate::error::{ModelError, Result};

/// Precomputed cos/sin tables, `[max_positions, rope_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
    max_positions: usize,
}

/// Inverse frequencies (`rope_dim / 2` values) and the cos/sin multiplier.
pub fn inv_freq(spec: &RopeSpec, rope_dim: usize) -> (Vec<f32>, f32) {
    // f32 arithmetic in the order transformers uses, so tables agree to the last bit or two.
    let half = rope_dim / 2;
    let theta = spec.theta as f32;
    let pos_freqs: Vec<f32> = (0..half)
        .map(|i| theta.powf((2 * i) as f32 / rope_dim as f32))
        .collect();
    let Some(y) = spec.yarn else {
        return (pos_freqs.iter().map(|&p| 1.0 / p).collect(), 1.0);
    };
    let correction_dim = |rotations: f64| {
        rope_dim as f64
            * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * spec.theta.ln())
    };
    let low = correction_dim(y.beta_fast).floor().max(0.0) as f32;
    let mut high = correction_dim(y.beta_slow)
        .ceil()
        .min(rope_dim as f64 - 1.0) as f32;
    if low == high {
        high += 0.001;
    }
    let factor = y.factor as f32;
    let freqs = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            (1.0 / (factor * p)) * (1.0 - extrapolation_weight) + (1.0 / p) * extrapolation_weight
        })
        .collect();
    (freqs, y.attention_factor as f32)
}

impl Rope {
    /// Tables for positions `0..max_positions`.
    pub fn new(
        spec: &RopeSpec,
        rope_dim: usize,
        max_positions: usize,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        let (freqs, scale) = inv_freq(spec, rope_dim);
        let half = freqs.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &freqs {
                // f32 product as transformers computes it (`inv_freq @ position` in float32).
                let angle = p as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            interleaved,
            max_positions,
        })
    }

    /// Largest position + 1 the tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos and sin rows for `positions` (as a u32 tensor `[n]`), each `[n, rope_dim / 2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` `[n, heads, rope_dim]` (or `[n, rope_dim]`) with per-row tables `[n, rope_dim/2]`;
    /// the result is in the halves layout.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = *dims
            .last()
            .ok_or_else(|| ModelError::Input("RoPE input has no dimensions".into()))?;
        let half = d / 2;
        let (a, b) = if self.interleaved {
            let mut pair_shape = dims.clone();
            pair_shape.pop();
            pair_shape.push(half);
            pair_shape.push(2);
            let pairs = x.reshape(pair_shape)?;
            (
                pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?,
                pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?,
            )
        } else {
            (
                x.narrow(D::Minus1, 0, half)?,
                x.narrow(D::Minus1, half, half)?,
            )
        };
        // Broadcast tables over the head dimension when present.
        let (cos, sin) = if dims.len() == 3 {
            (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
        } else {
            (cos.clone(), sin.clone())
        };
        let first = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let second = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[first, second], D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    #[test]
    fn rotation_preserves_pair_norms_and_position_zero_is_identity_up_to_layout() {
        let spec = RopeSpec {
            theta: 10_000.0,
            yarn: None,
        };
        let dev = Device::Cpu;
        let rope = Rope::new(&spec, 8, 16, true, &dev).unwrap();
        let x = Tensor::arange(1f32, 9., &dev)
            .unwrap()
            .reshape((1, 8))
            .unwrap();
        let (c, s) = rope.tables(&Tensor::new(&[0u32], &dev).unwrap()).unwrap();
        let y: Vec<f32> = rope
            .apply(&x, &c, &s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![1., 3., 5., 7., 2., 4., 6., 8.]);
        let (c, s) = rope.tables(&Tensor::new(&[7u32], &dev).unwrap()).unwrap();
        let y: Vec<f32> = rope
            .apply(&x, &c, &s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..4 {
            let before = ((2 * i + 1) as f32).powi(2) + ((2 * i + 2) as f32).powi(2);
            let after = y[i].powi(2) + y[i + 4].powi(2);
            assert!((before - after).abs() < 1e-3);
        }
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_divides_low_ones_by_factor() {
        let plain = RopeSpec {
            theta: 10_000.0,
            yarn: None,
        };
        let yarn = RopeSpec {
            theta: 10_000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 1.0,
                mscale_all_dim: 1.0,
            }),
        };
        let (p, _) = inv_freq(&plain, 64);
        let (y, _) = inv_freq(&yarn, 64);
        assert_eq!(p[0], y[0]);
        assert!((y[31] - p[31] / 40.0).abs() < 1e-9);
    }
}
