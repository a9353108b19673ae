//! Engine statistics maintained by [`EngineState`](crate::EngineState).
//!
//! Plain numbers, no metrics library: gauges (`num_*`, `kv_blocks_*`) describe the state after the last
//! operation; counters (`*_total`) only grow. The service maps them onto its Prometheus names
//! (`num_requests_running`, `kv_cache_usage_perc`, `num_preemptions_total`,
//! `spec_decode_num_drafts_total`, `spec_decode_num_accepted_tokens_per_pos`, ...).

use crate::stop::FinishReason;

/// Finished requests by finish reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishCounts {
    /// `length`.
    pub length: u64,
    /// `stop`.
    pub stop: u64,
    /// `abort`.
    pub abort: u64,
    /// `error`.
    pub error: u64,
}

impl FinishCounts {
    /// The counter of `reason`.
    pub fn get(&self, reason: FinishReason) -> u64 {
        match reason {
            FinishReason::Length => self.length,
            FinishReason::Stop => self.stop,
            FinishReason::Abort => self.abort,
            FinishReason::Error => self.error,
        }
    }

    pub(crate) fn add(&mut self, reason: FinishReason) {
        let slot = match reason {
            FinishReason::Length => &mut self.length,
            FinishReason::Stop => &mut self.stop,
            FinishReason::Abort => &mut self.abort,
            FinishReason::Error => &mut self.error,
        };
        *slot += 1;
    }

    /// All finished requests.
    pub fn total(&self) -> u64 {
        self.length + self.stop + self.abort + self.error
    }
}

/// Engine gauges and counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences admitted (holding KV blocks and being scheduled).
    pub num_running: usize,
    /// Sequences queued (new and preempted).
    pub num_waiting: usize,
    /// Finished sequences whose KV is retained until released.
    pub num_retained: usize,
    /// Blocks in the pool.
    pub kv_blocks_total: usize,
    /// Blocks owned by sequences.
    pub kv_blocks_used: usize,
    /// Requests accepted by `add_request`.
    pub requests_added_total: u64,
    /// Requests refused by `add_request` (too long, invalid, duplicate id).
    pub requests_rejected_total: u64,
    /// Finished requests by reason.
    pub requests_finished_total: FinishCounts,
    /// Preemptions (a sequence may be preempted several times).
    pub preemptions_total: u64,
    /// Non-empty steps planned.
    pub steps_total: u64,
    /// Tokens planned over all steps (prefill chunk tokens plus decode slots including draft slots).
    pub batched_tokens_total: u64,
    /// Prompt (and recompute) tokens planned for prefill.
    pub prefill_tokens_total: u64,
    /// Output tokens produced by this engine's steps (a prefill instance's first token not included).
    pub generation_tokens_total: u64,
    /// Decode steps that verified a draft.
    pub spec_drafts_total: u64,
    /// Draft tokens verified.
    pub spec_draft_tokens_total: u64,
    /// Draft tokens accepted.
    pub spec_accepted_tokens_total: u64,
    /// Accepted drafts per draft position (length `spec_tokens`).
    pub spec_accepted_per_pos: Vec<u64>,
    /// Executor outputs ignored because their sequence was no longer in the step (cancelled).
    pub ignored_outputs_total: u64,
}

impl EngineStats {
    /// Fraction of KV blocks in use, `0..=1`.
    pub fn kv_usage_fraction(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }

    /// Accepted over verified draft tokens, `None` before any draft.
    pub fn spec_acceptance_rate(&self) -> Option<f64> {
        (self.spec_draft_tokens_total > 0)
            .then(|| self.spec_accepted_tokens_total as f64 / self.spec_draft_tokens_total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ratios_handle_empty_counters() {
        let mut s = EngineStats::default();
        assert_eq!(
            (s.kv_usage_fraction(), s.spec_acceptance_rate()),
            (0.0, None)
        );
        s.kv_blocks_total = 8;
        s.kv_blocks_used = 2;
        s.spec_draft_tokens_total = 10;
        s.spec_accepted_tokens_total = 9;
        assert_eq!(s.kv_usage_fraction(), 0.25);
        assert_eq!(s.spec_acceptance_rate(), Some(0.9));
    }

    #[test]
    fn finish_counts_sum_by_reason() {
        let mut c = FinishCounts::default();
        c.add(FinishReason::Stop);
        c.add(FinishReason::Stop);
        c.add(FinishReason::Abort);
        assert_eq!(
            (
                c.get(FinishReason::Stop),
                c.get(FinishReason::Abort),
                c.total()
            ),
            (2, 1, 3)
        );
    }
}
