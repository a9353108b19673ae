//! The multi-token-prediction (MTP) module (DeepSeek-V3 §2.2), depth 1.
//!
//! It lives at checkpoint layer index `L = num_hidden_layers`: `enorm`, `hnorm`, `eh_proj`
//! `[hidden, 2·hidden]`, one decoder block (MLA + MoE, with its own latent-cache slot `L`), and
//! the shared head (`shared_head.norm`, `shared_head.head`). For position `i` of a sequence:
//!
//! ```text
//! x_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])      (embedding first, then hidden)
//! y_i = block(x_i)                                         (attends over MTP cache 0..=i)
//! logits_i = shared_head.head(shared_head.norm(y_i))       (predicts t_{i+2})
//! ```
//!
//! `h_i` is the main model's final hidden state *after* `model.norm`, as DeepSeek's released
//! inference code, vLLM and SGLang use it; the RoPE position of `x_i` is `i`. Transformers'
//! `DeepseekV3ForCausalLM` skips the MTP layer; its separate `MtpModel` (transformers 5.x) computes
//! the same thing but looks for the weights at the hard-coded layer index 61, so pdserve's goldens
//! run it through a small adapter that loads layer `num_hidden_layers` — no numerical difference.
//! `model.layers.{L}.embed_tokens` and `shared_head.head` are loaded when present (DeepSeek's
//! checkpoint stores copies of the main embedding and head) and fall back to the main model's.

use candle_core::{Device, Tensor};

use crate::batch::{BatchPlan, ForwardOptions, ForwardOutput, SequenceInput};
use crate::cache::LatentCache;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::experts::MoeExperts;
use crate::layers::{Linear, RmsNorm};
use crate::model::{DecoderLayer, DeepSeekV3};

/// Weights of the MTP module.
#[derive(Debug)]
pub(crate) struct MtpLayer {
    embed: Tensor,
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear,
    block: DecoderLayer,
    head_norm: RmsNorm,
    head: Linear,
}

impl MtpLayer {
    pub fn load(
        ckpt: &Checkpoint,
        index: usize,
        embed: &Tensor,
        lm_head: &Linear,
        dev: &Device,
    ) -> Result<Self> {
        let c = ckpt.config();
        let (v, h, eps) = (c.vocab_size, c.hidden_size, c.rms_norm_eps);
        let p = format!("model.layers.{index}");
        let own_embed = format!("{p}.embed_tokens.weight");
        let embed = if ckpt.contains(&own_embed) {
            ckpt.load_f32(&own_embed, &[v, h], dev)?
        } else {
            embed.clone()
        };
        let own_head = format!("{p}.shared_head.head.weight");
        let head = if ckpt.contains(&own_head) {
            Linear::load(ckpt, &format!("{p}.shared_head.head"), v, h, false, dev)?
        } else {
            lm_head.clone()
        };
        Ok(Self {
            embed,
            enorm: RmsNorm::load(ckpt, &format!("{p}.enorm"), h, eps, dev)?,
            hnorm: RmsNorm::load(ckpt, &format!("{p}.hnorm"), h, eps, dev)?,
            eh_proj: Linear::load(ckpt, &format!("{p}.eh_proj"), h, 2 * h, false, dev)?,
            block: DecoderLayer::load(ckpt, index, dev)?,
            head_norm: RmsNorm::load(ckpt, &format!("{p}.shared_head.norm"), h, eps, dev)?,
            head,
        })
    }
}

impl DeepSeekV3 {
    /// Runs the MTP module. `batch[b].tokens` are the *next* tokens `t_{i+1}` and
    /// `batch[b].start_pos` the position `i` of the first of them; `hidden` `[n, hidden]` holds
    /// the main model's final-normed hidden states `h_i` of those positions, in flattened batch
    /// order (e.g. `ForwardOutput::hidden` of the main forward, shifted by the caller). Appends to
    /// the MTP cache slot (`layer = num_hidden_layers`). The output's `hidden` is the MTP block's
    /// output (before `shared_head.norm`), ready to chain.
    pub fn mtp_forward(
        &self,
        batch: &[SequenceInput],
        hidden: &Tensor,
        cache: &mut dyn LatentCache,
        experts: &dyn MoeExperts,
        options: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let mtp = self.mtp.as_ref().ok_or_else(|| {
            ModelError::Input(
                "the checkpoint has no MTP module (num_nextn_predict_layers = 0)".into(),
            )
        })?;
        let plan = BatchPlan::new(batch, self.config().vocab_size, self.rope.max_positions())?;
        let n = plan.n_tokens();
        let (rows, width) = hidden.dims2()?;
        if rows != n || width != self.config().hidden_size {
            return Err(ModelError::Input(format!(
                "MTP hidden states have shape [{rows}, {width}], the batch needs [{n}, {}]",
                self.config().hidden_size
            )));
        }
        let ids = plan.ids_tensor(self.device())?;
        let e = mtp.enorm.forward(&mtp.embed.index_select(&ids, 0)?)?;
        let h = mtp.hnorm.forward(hidden)?;
        let x = mtp.eh_proj.forward(&Tensor::cat(&[e, h], 1)?)?;
        let (y, trace) = self.run_layers(
            &plan,
            x,
            std::slice::from_ref(&mtp.block),
            cache,
            experts,
            options,
        )?;
        let logits = self.head(&plan, &y, |rows| {
            mtp.head.forward(&mtp.head_norm.forward(rows)?)
        })?;
        Ok(ForwardOutput {
            logits,
            logit_rows: plan.logit_rows,
            hidden: y,
            routing: trace,
        })
    }
}
