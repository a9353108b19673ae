//! A step's batch: per DP rank (GPU), the requests it runs and how many tokens each adds.
//!
//! Decode requests add one token (two when verifying an MTP draft) on top of `cached_tokens` of
//! latent KV; prefill requests add a chunk of prompt tokens. Tokens are numbered per rank in
//! request order; [`LayerRouting`](crate::LayerRouting) uses the same numbering.
//!
//! Two-micro-batch overlap splits each rank's tokens at one point ([`RankBatch::split_point`]): the
//! request boundary nearest half the tokens. In prefill, when a single request holds more than a
//! quarter of the tokens on each side of that boundary, the split is the exact middle instead (a
//! long prompt is then split between the micro-batches, as DeepSeek's prefill does). A decode
//! request is never split: its tokens (the input and an MTP draft) are one query of one forward,
//! so a rank with a single decode request leaves one micro-batch empty.

use serde::{Deserialize, Serialize};

use crate::error::FabricError;

/// Which service runs the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Prompt processing (stages ATTN, SHARED, MLP).
    Prefill,
    /// Token generation (stages ATTN-0, ATTN-1, SHARED, MLP).
    Decode,
}

/// One request's part in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSlot {
    /// Tokens already in the request's KV cache before this step.
    pub cached_tokens: u32,
    /// Tokens this step processes for the request (1 for plain decode).
    pub new_tokens: u32,
}

/// One DP rank's requests.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RankBatch {
    /// Requests in token order.
    pub requests: Vec<RequestSlot>,
}

/// The whole EP group's batch for one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepBatch {
    /// One entry per GPU of the EP group.
    pub ranks: Vec<RankBatch>,
}

/// The attention work of one rank's share of a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionLoad {
    /// Tokens processed.
    pub tokens: u64,
    /// Σ over tokens of the keys each attends to (causal): drives attention FLOPs.
    pub attended_keys: u64,
    /// Σ over request pieces of the KV entries read once for the piece: drives attention bytes.
    pub kv_entries_read: u64,
}

impl RankBatch {
    /// Tokens on this rank.
    pub fn tokens(&self) -> u64 {
        self.requests.iter().map(|r| u64::from(r.new_tokens)).sum()
    }

    /// The token index where micro-batch 1 starts in `phase` (see the module doc).
    pub fn split_point(&self, phase: Phase) -> u64 {
        let total = self.tokens();
        let half = total as f64 / 2.0;
        let mut best = 0u64;
        let mut acc = 0u64;
        for r in &self.requests {
            acc += u64::from(r.new_tokens);
            if (acc as f64 - half).abs() < (best as f64 - half).abs() {
                best = acc;
            }
        }
        if phase == Phase::Prefill && (best as f64 - half).abs() > total as f64 / 4.0 {
            total.div_ceil(2)
        } else {
            best
        }
    }

    /// Attention load of tokens `lo..hi` of this rank.
    pub fn attention_load(&self, lo: u64, hi: u64) -> AttentionLoad {
        let mut load = AttentionLoad::default();
        let mut start = 0u64;
        for r in &self.requests {
            let end = start + u64::from(r.new_tokens);
            let a = lo.max(start);
            let b = hi.min(end);
            if a < b {
                let prior = u64::from(r.cached_tokens) + (a - start);
                let len = b - a;
                load.tokens += len;
                load.attended_keys += len * prior + len * (len + 1) / 2;
                load.kv_entries_read += prior + len;
            }
            start = end;
        }
        load
    }
}

impl StepBatch {
    /// `ranks` ranks with `requests_per_rank` identical requests each.
    pub fn uniform(
        ranks: u32,
        requests_per_rank: u32,
        cached_tokens: u32,
        new_tokens: u32,
    ) -> Self {
        let rank = RankBatch {
            requests: vec![
                RequestSlot {
                    cached_tokens,
                    new_tokens
                };
                requests_per_rank as usize
            ],
        };
        Self {
            ranks: vec![rank; ranks as usize],
        }
    }

    /// Tokens per rank, as [`LayerRouting::new`](crate::LayerRouting::new) wants them.
    pub fn tokens_per_rank(&self) -> Vec<u32> {
        self.ranks
            .iter()
            .map(|r| r.tokens().min(u64::from(u32::MAX)) as u32)
            .collect()
    }

    /// Checks the batch against the EP group size.
    pub fn validate(&self, num_gpus: u32) -> Result<(), FabricError> {
        if self.ranks.len() != num_gpus as usize {
            return Err(FabricError::invalid(
                "batch",
                "ranks",
                format!(
                    "has {} ranks for an EP group of {num_gpus} GPUs",
                    self.ranks.len()
                ),
            ));
        }
        for (i, r) in self.ranks.iter().enumerate() {
            if r.tokens() > u64::from(u32::MAX) {
                return Err(FabricError::invalid(
                    "batch",
                    format!("ranks[{i}]"),
                    "too many tokens",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_ranks_split_at_the_request_boundary_nearest_half() {
        let b = StepBatch::uniform(1, 5, 100, 2);
        assert_eq!(b.ranks[0].split_point(Phase::Decode), 4);
    }

    #[test]
    fn a_decode_request_is_never_split_between_micro_batches() {
        // One request verifying a draft: both tokens stay together (micro-batch 0 is empty).
        let one = StepBatch::uniform(1, 1, 100, 2);
        assert_eq!(one.ranks[0].split_point(Phase::Decode), 0);
        // The same shape as a prompt chunk is split in the middle.
        assert_eq!(one.ranks[0].split_point(Phase::Prefill), 1);
        // Three requests of 2 tokens: the boundary nearest half, 2 or 4 tokens.
        let three = StepBatch::uniform(1, 3, 100, 2);
        assert_eq!(three.ranks[0].split_point(Phase::Decode), 2);
    }

    #[test]
    fn a_single_long_prompt_is_split_in_the_middle() {
        let r = RankBatch {
            requests: vec![RequestSlot {
                cached_tokens: 0,
                new_tokens: 4096,
            }],
        };
        assert_eq!(r.split_point(Phase::Prefill), 2048);
        let second = r.attention_load(2048, 4096);
        assert_eq!(second.tokens, 2048);
        // Token i of the second half attends 2048 + i + 1 keys.
        assert_eq!(second.attended_keys, 2048 * 2048 + 2048 * 2049 / 2);
        assert_eq!(second.kv_entries_read, 4096);
    }

    #[test]
    fn decode_attention_reads_each_requests_cache_once() {
        let r = RankBatch {
            requests: vec![
                RequestSlot {
                    cached_tokens: 1000,
                    new_tokens: 2
                };
                3
            ],
        };
        let load = r.attention_load(0, 6);
        assert_eq!(load.kv_entries_read, 3 * 1002);
        assert_eq!(load.attended_keys, 3 * (1001 + 1002));
    }
}
