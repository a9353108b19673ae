//! Scheduler configuration and its validation.
//!
//! Invariant established by [`SchedulerConfig::validate`]: one sequence at the model's context limit,
//! plus its draft slots, fits in the pool (`ceil((max_context_tokens + spec_tokens) / 64) <= num_kv_blocks`)
//! and one decode step fits in the token budget. Together with the scheduler's preemption order this
//! guarantees progress: the oldest running sequence can always get its blocks by preempting newer ones,
//! so every admitted request eventually finishes and a full pool never crashes or deadlocks.

use serde::{Deserialize, Serialize};

use crate::block_pool::{BLOCK_SIZE_TOKENS, blocks_for_tokens};
use crate::microbatch::WorkWeights;

/// Scheduler settings (one per engine instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// KV blocks of 64 tokens in the pool.
    pub num_kv_blocks: usize,
    /// Most tokens planned in one step: prefill chunk tokens plus `1 + spec_tokens` per decode.
    pub max_batched_tokens: usize,
    /// Most sequences admitted at once.
    pub max_running_seqs: usize,
    /// Most prompt tokens one sequence computes in one step (chunked prefill).
    pub prefill_chunk_tokens: usize,
    /// Model context length: prompt plus output never exceeds it (finish reason `length`).
    pub max_context_tokens: usize,
    /// Draft tokens verified per decode step (MTP depth): 0 (off) or 1.
    pub spec_tokens: usize,
    /// Two-batch overlap: split each step into two micro-batches balanced with these weights;
    /// absent = off.
    pub two_batch_overlap: Option<WorkWeights>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_kv_blocks: 1024,
            max_batched_tokens: 2048,
            max_running_seqs: 256,
            prefill_chunk_tokens: 512,
            max_context_tokens: 16 * 1024,
            spec_tokens: 0,
            two_batch_overlap: None,
        }
    }
}

/// An invalid setting, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scheduler config: `{field}` {problem}")]
pub struct ConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl SchedulerConfig {
    /// Checks every field and the invariants in the module docs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, problem: String| Err(ConfigError { field, problem });
        for (field, value) in [
            ("num_kv_blocks", self.num_kv_blocks),
            ("max_running_seqs", self.max_running_seqs),
            ("prefill_chunk_tokens", self.prefill_chunk_tokens),
        ] {
            if value == 0 {
                return err(field, "must be at least 1".into());
            }
        }
        if u32::try_from(self.num_kv_blocks).is_err() {
            return err(
                "num_kv_blocks",
                format!("{} exceeds the 32-bit block id range", self.num_kv_blocks),
            );
        }
        if self.spec_tokens > 1 {
            return err(
                "spec_tokens",
                format!("must be 0 or 1 (MTP depth 1), got {}", self.spec_tokens),
            );
        }
        if self.max_context_tokens < 2 {
            return err(
                "max_context_tokens",
                format!("must be at least 2, got {}", self.max_context_tokens),
            );
        }
        let decode_tokens = 1 + self.spec_tokens;
        if self.max_batched_tokens < decode_tokens {
            return err(
                "max_batched_tokens",
                format!(
                    "must be at least {decode_tokens} (one decode step with spec_tokens {}), got {}",
                    self.spec_tokens, self.max_batched_tokens
                ),
            );
        }
        let needed = blocks_for_tokens(self.max_context_tokens + self.spec_tokens);
        if needed > self.num_kv_blocks {
            return err(
                "num_kv_blocks",
                format!(
                    "{} blocks of {BLOCK_SIZE_TOKENS} tokens cannot hold one sequence at \
                     max_context_tokens {} (+{} draft slot): needs {needed}",
                    self.num_kv_blocks, self.max_context_tokens, self.spec_tokens
                ),
            );
        }
        if let Some(weights) = self.two_batch_overlap
            && weights.per_token == 0
        {
            return err(
                "two_batch_overlap.per_token",
                "must be at least 1 so that every item has work".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        SchedulerConfig::default().validate().unwrap();
    }

    #[test]
    fn pool_smaller_than_one_context_is_rejected() {
        let c = SchedulerConfig {
            num_kv_blocks: 16,
            max_context_tokens: 1024,
            spec_tokens: 1,
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "num_kv_blocks");
        assert!(e.to_string().contains("needs 17"), "{e}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                SchedulerConfig {
                    num_kv_blocks: 0,
                    ..Default::default()
                },
                "num_kv_blocks",
            ),
            (
                SchedulerConfig {
                    max_running_seqs: 0,
                    ..Default::default()
                },
                "max_running_seqs",
            ),
            (
                SchedulerConfig {
                    prefill_chunk_tokens: 0,
                    ..Default::default()
                },
                "prefill_chunk_tokens",
            ),
            (
                SchedulerConfig {
                    spec_tokens: 2,
                    ..Default::default()
                },
                "spec_tokens",
            ),
            (
                SchedulerConfig {
                    max_context_tokens: 1,
                    ..Default::default()
                },
                "max_context_tokens",
            ),
            (
                SchedulerConfig {
                    max_batched_tokens: 1,
                    spec_tokens: 1,
                    ..Default::default()
                },
                "max_batched_tokens",
            ),
            (
                SchedulerConfig {
                    two_batch_overlap: Some(WorkWeights {
                        attention_per_pair: 1,
                        per_token: 0,
                    }),
                    ..Default::default()
                },
                "two_batch_overlap.per_token",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn toml_fills_defaults_and_rejects_unknown_fields() {
        let c: SchedulerConfig =
            toml::from_str("spec_tokens = 1\n[two_batch_overlap]\nper_token = 5\n").unwrap();
        assert_eq!(c.spec_tokens, 1);
        assert_eq!(c.num_kv_blocks, SchedulerConfig::default().num_kv_blocks);
        let w = c.two_batch_overlap.unwrap();
        assert_eq!(
            (w.per_token, w.attention_per_pair),
            (5, WorkWeights::default().attention_per_pair)
        );
        assert!(toml::from_str::<SchedulerConfig>("max_tokens = 3").is_err());
    }
}
