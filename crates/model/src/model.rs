//! The DeepSeek-V3 model: embedding, decoder layers (MLA + dense MLP or MoE), final norm, head.
//!
//! The model holds weights only. Serving state is passed in: the latent cache
//! ([`LatentCache`]), the batch layout ([`SequenceInput`]s), and the routed experts
//! ([`MoeExperts`]). `forward` takes `&self`, so several threads may run forwards of different
//! micro-batches on one loaded model.
//!
//! Layer `l` (DeepSeek-V3 §2.1): `x += MLA(input_layernorm(x))`, then
//! `x += FFN(post_attention_layernorm(x))`, where FFN is the dense SwiGLU MLP for
//! `l < first_k_dense_replace` and otherwise MoE = shared expert + routed experts chosen by the
//! gate ([`crate::routing`]). Logits are `lm_head(norm(x))`.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::attention::{AttentionBatch, Mla};
use crate::batch::{
    BatchPlan, ForwardOptions, ForwardOutput, LayerRouting, RoutingTrace, SequenceInput,
};
use crate::cache::LatentCache;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::experts::{LocalExperts, MoeExperts};
use crate::layers::{Linear, Mlp, RmsNorm};
use crate::mtp::MtpLayer;
use crate::rope::Rope;
use crate::routing::Gate;

/// The feed-forward block of a layer.
#[derive(Debug)]
pub(crate) enum Ffn {
    Dense(Mlp),
    Moe { gate: Gate, shared: Option<Mlp> },
}

/// One decoder layer (main or MTP block).
#[derive(Debug)]
pub(crate) struct DecoderLayer {
    pub index: usize,
    input_norm: RmsNorm,
    attn: Mla,
    post_norm: RmsNorm,
    ffn: Ffn,
}

impl DecoderLayer {
    pub fn load(ckpt: &Checkpoint, index: usize, dev: &Device) -> Result<Self> {
        let c = ckpt.config();
        let p = format!("model.layers.{index}");
        let h = c.hidden_size;
        let eps = c.rms_norm_eps;
        let ffn = if c.is_moe_layer(index) {
            let moe = c.moe()?;
            let weight = ckpt.load_f32(
                &format!("{p}.mlp.gate.weight"),
                &[moe.n_routed_experts, h],
                dev,
            )?;
            let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
            let bias = match moe.method {
                crate::config::TopkMethod::NoauxTc => {
                    Some(ckpt.read_f32(&bias_name, &[moe.n_routed_experts])?)
                }
                _ => None,
            };
            let shared = if moe.shared_intermediate > 0 {
                Some(Mlp::load(
                    ckpt,
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    moe.shared_intermediate,
                    dev,
                )?)
            } else {
                None
            };
            Ffn::Moe {
                gate: Gate::new(weight, bias, moe),
                shared,
            }
        } else {
            Ffn::Dense(Mlp::load(
                ckpt,
                &format!("{p}.mlp"),
                h,
                c.intermediate_size,
                dev,
            )?)
        };
        Ok(Self {
            index,
            input_norm: RmsNorm::load(ckpt, &format!("{p}.input_layernorm"), h, eps, dev)?,
            attn: Mla::load(ckpt, &format!("{p}.self_attn"), dev)?,
            post_norm: RmsNorm::load(ckpt, &format!("{p}.post_attention_layernorm"), h, eps, dev)?,
            ffn,
        })
    }

    /// `x` `[n, hidden]` → `[n, hidden]`; records the routing of an MoE layer in `trace`.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &AttentionBatch<'_>,
        rope: &Rope,
        state: &mut LayerState<'_>,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let a = self
            .attn
            .forward(&h, batch, rope, state.cache, self.index)?;
        let x = (x + a)?;
        let h = self.post_norm.forward(&x)?;
        let f = match &self.ffn {
            Ffn::Dense(mlp) => mlp.forward(&h)?,
            Ffn::Moe { gate, shared } => {
                let routing = gate.route(&h)?;
                let routed = state.experts.routed_forward(self.index, &h, &routing)?;
                if routed.dims() != h.dims() {
                    return Err(ModelError::Input(format!(
                        "experts of layer {} returned shape {:?} for input {:?}",
                        self.index,
                        routed.dims(),
                        h.dims()
                    )));
                }
                state.trace.layers.push(LayerRouting {
                    layer: self.index,
                    routing,
                });
                match shared {
                    Some(s) => (routed + s.forward(&h)?)?,
                    None => routed,
                }
            }
        };
        Ok((x + f)?)
    }
}

/// Mutable per-forward state threaded through the layers.
pub(crate) struct LayerState<'a> {
    pub cache: &'a mut dyn LatentCache,
    pub experts: &'a dyn MoeExperts,
    pub trace: RoutingTrace,
}

/// A loaded DeepSeek-V3 (weights except the routed experts, which live in a [`MoeExperts`]).
#[derive(Debug)]
pub struct DeepSeekV3 {
    config: ModelConfig,
    pub(crate) embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    pub(crate) mtp: Option<MtpLayer>,
    pub(crate) rope: Rope,
    device: Device,
}

impl DeepSeekV3 {
    /// Loads the checkpoint in `dir` (any of f32/bf16/f16/FP8 on disk; f32 in memory) and all its
    /// routed experts into a [`LocalExperts`].
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, LocalExperts)> {
        let ckpt = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(&ckpt, device)?;
        let experts = LocalExperts::load(&ckpt, device)?;
        Ok((model, experts))
    }

    /// Loads everything but the routed experts from an opened checkpoint.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let c = ckpt.config().clone();
        let (v, h) = (c.vocab_size, c.hidden_size);
        let embed = ckpt.load_f32("model.embed_tokens.weight", &[v, h], device)?;
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load(ckpt, l, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(ckpt, "model.norm", h, c.rms_norm_eps, device)?;
        let lm_head = if c.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            Linear::load(ckpt, "lm_head", v, h, false, device)?
        };
        let mtp = if c.num_nextn_predict_layers > 0 {
            Some(MtpLayer::load(
                ckpt,
                c.num_hidden_layers,
                &embed,
                &lm_head,
                device,
            )?)
        } else {
            None
        };
        let rope = Rope::new(
            &c.rope()?,
            c.qk_rope_head_dim,
            c.max_position_embeddings,
            c.rope_interleave,
            device,
        )?;
        Ok(Self {
            config: c,
            embed,
            layers,
            norm,
            lm_head,
            mtp,
            rope,
            device: device.clone(),
        })
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint has an MTP module.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Runs the main model over `batch`, appending every new token's latent to `cache` (layers
    /// `0..num_hidden_layers`).
    pub fn forward(
        &self,
        batch: &[SequenceInput],
        cache: &mut dyn LatentCache,
        experts: &dyn MoeExperts,
        options: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let plan = BatchPlan::new(batch, self.config.vocab_size, self.rope.max_positions())?;
        let ids = plan.ids_tensor(&self.device)?;
        let x = self.embed.index_select(&ids, 0)?;
        let (hidden, trace) = self.run_layers(&plan, x, &self.layers, cache, experts, options)?;
        let hidden = self.norm.forward(&hidden)?;
        let logits = self.head(&plan, &hidden, |h| self.lm_head.forward(h))?;
        Ok(ForwardOutput {
            logits,
            logit_rows: plan.logit_rows,
            hidden,
            routing: trace,
        })
    }

    /// Runs `layers` over the embedded batch `x`.
    pub(crate) fn run_layers(
        &self,
        plan: &BatchPlan,
        x: Tensor,
        layers: &[DecoderLayer],
        cache: &mut dyn LatentCache,
        experts: &dyn MoeExperts,
        options: &ForwardOptions,
    ) -> Result<(Tensor, RoutingTrace)> {
        let positions = plan.positions_tensor(&self.device)?;
        let (cos, sin) = self.rope.tables(&positions)?;
        let batch = AttentionBatch {
            spans: &plan.spans,
            cos: &cos,
            sin: &sin,
            path: options.attention,
        };
        let mut state = LayerState {
            cache,
            experts,
            trace: RoutingTrace::default(),
        };
        let mut x = x;
        for layer in layers {
            x = layer.forward(&x, &batch, &self.rope, &mut state)?;
        }
        Ok((x, state.trace))
    }

    /// Logits of the requested rows of `hidden` through `head`.
    pub(crate) fn head(
        &self,
        plan: &BatchPlan,
        hidden: &Tensor,
        head: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match plan.logit_rows_tensor(&self.device)? {
            Some(rows) => head(&hidden.index_select(&rows, 0)?),
            None => Ok(Tensor::zeros(
                (0, self.config.vocab_size),
                candle_core::DType::F32,
                &self.device,
            )?),
        }
    }
}
