//! DeepSeek-V3 (MLA + DeepSeekMoE + MTP) on candle, loading Hugging Face checkpoints.
//!
//! Principal types:
//! - [`ModelConfig`]: serde mirror of `config.json` (`deepseek_v3`, V2-style values too);
//!   [`ModelConfig::validate`] names the key at fault.
//! - [`Checkpoint`]: `config.json` + `model.safetensors` (or shards with
//!   `model.safetensors.index.json`), tensors read by their checkpoint names, f32/bf16/f16/FP8.
//! - [`DeepSeekV3`]: the loaded model (all weights but the routed experts). Its
//!   [`forward`](DeepSeekV3::forward) runs a ragged batch of [`SequenceInput`]s against a
//!   caller-owned [`LatentCache`] and a caller-chosen [`MoeExperts`], and returns a
//!   [`ForwardOutput`] (logits, final hidden states, [`RoutingTrace`]).
//!   [`mtp_forward`](DeepSeekV3::mtp_forward) runs the MTP module.
//! - [`LatentCache`] / [`ContiguousLatentCache`]: the MLA latent cache (`c_kv`, `k_rope`) per
//!   (sequence, layer); layer `num_hidden_layers` is the MTP slot.
//! - [`MoeExperts`] / [`LocalExperts`] / [`ExpertBank`]: routed-expert execution behind a trait
//!   (the EP runtime's seam); the gate and the shared expert stay in the model. Tokens are grouped
//!   by expert: two matmuls per active expert on views, everything else batched.
//! - [`sampling`]: [`SamplingParams`], a seeded per-request [`Sampler`], [`SampledToken`].
//! - [`Tokenizer`]: byte-level BPE + chat template.
//! - [`tiny`]: the deterministic tiny checkpoint (`pdserve model init`) and the embedded default.
//!
//! ```no_run
//! use candle_core::Device;
//! use pdserve_model::{ContiguousLatentCache, DeepSeekV3, ForwardOptions, LatentCache, SequenceInput};
//!
//! # fn main() -> pdserve_model::Result<()> {
//! let dir = pdserve_model::tiny::ensure_default(None)?;
//! let (model, experts) = DeepSeekV3::load(&dir, &Device::Cpu)?;
//! let c = model.config();
//! let mut cache = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu);
//! // Prefill two prompts of different lengths in one batch…
//! let batch = [SequenceInput::new(1, vec![0, 17, 42], 0), SequenceInput::new(2, vec![0, 9], 0)];
//! let out = model.forward(&batch, &mut cache, &experts, &ForwardOptions::default())?;
//! let next = out.last_logits(0)?; // next-token logits of sequence 1
//! // …then decode one token of sequence 1 through the latent cache (absorbed attention).
//! let step = [SequenceInput::new(1, vec![7], cache.len(1, 0))];
//! let out = model.forward(&step, &mut cache, &experts, &ForwardOptions::default())?;
//! # let _ = (next, out); Ok(()) }
//! ```
//!
//! Threads: candle re-derives its matmul thread count from `/proc` on every matmul unless the
//! `RAYON_NUM_THREADS` environment variable is set (about 40 µs per matmul on the development
//! machine, more than the tiny model's whole matmul). Binaries should set it once at start-up.

pub mod attention;
pub mod batch;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod experts;
pub mod layers;
pub mod model;
pub mod mtp;
pub mod rng;
pub mod rope;
pub mod routing;
pub mod sampling;
pub mod tiny;
pub mod tokenizer;
pub mod writer;

pub use attention::{ABSORBED_MAX_NEW_TOKENS, AttentionPath};
pub use batch::{
    ForwardOptions, ForwardOutput, LayerRouting, LogitRow, LogitsWanted, RoutingTrace,
    SequenceInput,
};
pub use cache::{ContiguousLatentCache, LatentCache, SeqId};
pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use experts::{ExpertBank, ExpertPair, LocalExperts, MoeExperts};
pub use model::DeepSeekV3;
pub use routing::{Gate, Routing};
pub use sampling::{SampledToken, Sampler, SamplingParams};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use writer::SafetensorsWriter;
