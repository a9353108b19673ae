//! Inputs and outputs of a batched forward.
//!
//! A batch is a list of [`SequenceInput`]s, each with its new token ids and the RoPE position of
//! the first one: prefill chunks and single decode tokens mix freely, and lengths differ. The
//! forward flattens them in order (sequence 0's tokens, then sequence 1's, …); every per-token
//! tensor of a [`ForwardOutput`] (`hidden`) uses that order, and `logits` holds only the rows the
//! sequences asked for ([`LogitsWanted`]), described by `logit_rows`.

use candle_core::{Device, Tensor};

use crate::attention::{AttentionPath, SeqSpan};
use crate::cache::SeqId;
use crate::error::{ModelError, Result};
use crate::routing::Routing;

/// Which logits a sequence wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    /// Only the last new token's (the next-token distribution).
    #[default]
    Last,
    /// Every new token's (scoring, speculative verification, tests).
    All,
    /// None (a prefill chunk that is not the prompt's last).
    None,
}

/// One sequence of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceInput {
    /// Cache key of the sequence.
    pub seq: SeqId,
    /// New token ids (at least one).
    pub tokens: Vec<u32>,
    /// RoPE position of `tokens[0]` (normally the number of tokens already cached).
    pub start_pos: usize,
    /// Logits wanted.
    pub logits: LogitsWanted,
}

impl SequenceInput {
    /// A sequence wanting its last logits.
    pub fn new(seq: SeqId, tokens: Vec<u32>, start_pos: usize) -> Self {
        Self {
            seq,
            tokens,
            start_pos,
            logits: LogitsWanted::Last,
        }
    }

    /// The same sequence wanting `logits`.
    pub fn with_logits(mut self, logits: LogitsWanted) -> Self {
        self.logits = logits;
        self
    }
}

/// Options of one forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardOptions {
    /// Attention path ([`AttentionPath::Auto`] unless a test forces one).
    pub attention: AttentionPath,
}

/// Where a logits row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogitRow {
    /// Index of the sequence in the batch.
    pub batch_index: usize,
    /// RoPE position of the token.
    pub position: usize,
    /// Row of the token in the flattened batch.
    pub token_row: usize,
}

/// The routing of one MoE layer in one forward.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRouting {
    /// Checkpoint layer index (the MTP layer is `num_hidden_layers`).
    pub layer: usize,
    /// Expert ids and weights of every token of the batch, in flattened order.
    pub routing: Routing,
}

/// Every MoE layer's routing decision of one forward, in layer order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutingTrace {
    /// One entry per MoE layer run.
    pub layers: Vec<LayerRouting>,
}

/// Result of a forward (main model or MTP).
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[rows, vocab]` logits of the requested tokens.
    pub logits: Tensor,
    /// Origin of each logits row.
    pub logit_rows: Vec<LogitRow>,
    /// `[n, hidden]` per new token. Main forward: the final hidden state after `model.norm` (the
    /// MTP module's `h_i`). MTP forward: the MTP block's output before `shared_head.norm`.
    pub hidden: Tensor,
    /// Routing of every MoE layer.
    pub routing: RoutingTrace,
}

impl ForwardOutput {
    /// Logits rows of sequence `batch_index` (`[k, vocab]`, in position order).
    pub fn logits_of(&self, batch_index: usize) -> Result<Tensor> {
        let rows: Vec<u32> = self
            .logit_rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.batch_index == batch_index)
            .map(|(i, _)| i as u32)
            .collect();
        if rows.is_empty() {
            return Err(ModelError::Input(format!(
                "sequence {batch_index} asked for no logits"
            )));
        }
        let n = rows.len();
        Ok(self
            .logits
            .index_select(&Tensor::from_vec(rows, n, self.logits.device())?, 0)?)
    }

    /// The last logits row of sequence `batch_index` as a vector.
    pub fn last_logits(&self, batch_index: usize) -> Result<Vec<f32>> {
        let i = self
            .logit_rows
            .iter()
            .rposition(|r| r.batch_index == batch_index)
            .ok_or_else(|| {
                ModelError::Input(format!("sequence {batch_index} asked for no logits"))
            })?;
        Ok(self.logits.get(i)?.to_vec1()?)
    }
}

/// A validated, flattened batch.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    pub spans: Vec<SeqSpan>,
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub logit_rows: Vec<LogitRow>,
}

impl BatchPlan {
    pub fn new(batch: &[SequenceInput], vocab: usize, max_positions: usize) -> Result<Self> {
        if batch.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut logit_rows = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (b, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::Input(format!(
                    "sequence {} has no new tokens",
                    s.seq
                )));
            }
            if !seen.insert(s.seq) {
                return Err(ModelError::Input(format!(
                    "sequence {} appears twice in the batch",
                    s.seq
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ModelError::Input(format!(
                    "sequence {}: token id {bad} outside the vocabulary of {vocab}",
                    s.seq
                )));
            }
            let end = s.start_pos + s.tokens.len();
            if end > max_positions {
                return Err(ModelError::Input(format!(
                    "sequence {}: positions up to {} exceed max_position_embeddings {max_positions}",
                    s.seq,
                    end - 1
                )));
            }
            let offset = ids.len();
            spans.push(SeqSpan {
                seq: s.seq,
                offset,
                len: s.tokens.len(),
            });
            ids.extend_from_slice(&s.tokens);
            positions.extend((s.start_pos..end).map(|p| p as u32));
            let wanted = match s.logits {
                LogitsWanted::Last => s.tokens.len() - 1..s.tokens.len(),
                LogitsWanted::All => 0..s.tokens.len(),
                LogitsWanted::None => 0..0,
            };
            logit_rows.extend(wanted.map(|i| LogitRow {
                batch_index: b,
                position: s.start_pos + i,
                token_row: offset + i,
            }));
        }
        Ok(Self {
            spans,
            ids,
            positions,
            logit_rows,
        })
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn ids_tensor(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.ids, self.ids.len(), dev)?)
    }

    pub fn positions_tensor(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.positions,
            self.positions.len(),
            dev,
        )?)
    }

    pub fn logit_rows_tensor(&self, dev: &Device) -> Result<Option<Tensor>> {
        if self.logit_rows.is_empty() {
            return Ok(None);
        }
        let rows: Vec<u32> = self.logit_rows.iter().map(|r| r.token_row as u32).collect();
        let n = rows.len();
        Ok(Some(Tensor::from_vec(rows, n, dev)?))
    }
}
