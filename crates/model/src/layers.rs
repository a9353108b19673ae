//! Small building blocks: weight-only linear layers, RMSNorm, the SwiGLU MLP, and the loader
//! helpers that read them by checkpoint name with the shape `config.json` implies.

use candle_core::{D, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// `y = x · Wᵀ (+ b)`, `W` stored `[out, in]` as in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `{prefix}.weight` `[out, in]` (and `{prefix}.bias` `[out]` when `bias`).
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self> {
        let weight = ckpt.load_f32(&format!("{prefix}.weight"), &[out_dim, in_dim], dev)?;
        let bias = if bias {
            Some(ckpt.load_f32(&format!("{prefix}.bias"), &[out_dim], dev)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer to `x` `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w`, over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// A norm from its weight and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    /// Loads `{prefix}.weight` `[dim]`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dim: usize,
        eps: f64,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Self::new(
            ckpt.load_f32(&format!("{prefix}.weight"), &[dim], dev)?,
            eps,
        ))
    }

    /// Normalizes `x` `[…, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}

/// The SwiGLU MLP of dense layers and shared experts: `down(silu(gate(x)) · up(x))`.
///
/// `gate_proj` and `up_proj` are fused into one `[2·inter, hidden]` matrix at load (one matmul).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Tensor,
    down: Tensor,
    inter: usize,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj`, `{prefix}.up_proj`, `{prefix}.down_proj`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        inter: usize,
        dev: &Device,
    ) -> Result<Self> {
        let gate = ckpt.load_f32(&format!("{prefix}.gate_proj.weight"), &[inter, hidden], dev)?;
        let up = ckpt.load_f32(&format!("{prefix}.up_proj.weight"), &[inter, hidden], dev)?;
        let down = ckpt.load_f32(&format!("{prefix}.down_proj.weight"), &[hidden, inter], dev)?;
        Ok(Self {
            gate_up: Tensor::cat(&[gate, up], 0)?,
            down,
            inter,
        })
    }

    /// Applies the MLP to `x` `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = x.matmul(&self.gate_up.t()?)?;
        let h = swiglu(&gu, self.inter)?;
        Ok(h.matmul(&self.down.t()?)?)
    }
}

/// `silu(gu[..., :inter]) · gu[..., inter:]` for a fused gate/up projection.
pub fn swiglu(gu: &Tensor, inter: usize) -> Result<Tensor> {
    let gate = gu.narrow(D::Minus1, 0, inter)?;
    let up = gu.narrow(D::Minus1, inter, inter)?;
    Ok((candle_nn::ops::silu(&gate)? * up)?)
}
