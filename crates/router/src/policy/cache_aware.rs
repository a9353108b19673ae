//! Cache-aware routing: requests sharing a prompt prefix go to the same instance, so its prefix
//! cache can serve them, unless that instance is overloaded.
//!
//! The prefix key is a hash chained over the full 64-token blocks (the KV block size) within the
//! first `prefix_tokens` tokens. Its preferred instance is chosen by rendezvous hashing (highest
//! `mix(key, id)` among eligible instances), which is stable: adding or losing an instance only moves
//! the keys that instance wins or held. Prompts shorter than one block have no key and go to the
//! least-loaded instance.
//!
//! Imbalance guard: when `load(preferred) − min_load > balance_abs_tokens` **and**
//! `load(preferred) > balance_rel × min_load` (loads as in [`super::load_score`]), affinity yields and
//! the least-loaded instance wins.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::least_load::least_loaded;
use super::{InstanceView, Policy, RequestFeatures, load_score};

/// Tokens per KV block (FlashMLA's block size); prefix keys cover whole blocks only.
pub const BLOCK_TOKENS: u32 = 64;

/// Cache-aware parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheAwareConfig {
    /// Prompt tokens (rounded down to whole 64-token blocks) that form the affinity key.
    pub prefix_tokens: u32,
    /// Absolute load gap (tokens) above which affinity may yield.
    pub balance_abs_tokens: u64,
    /// Relative load ratio above which affinity may yield.
    pub balance_rel: f64,
    /// KV pressure weight of the load score.
    pub kv_weight_tokens: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        CacheAwareConfig {
            prefix_tokens: 256,
            balance_abs_tokens: 4096,
            balance_rel: 1.5,
            kv_weight_tokens: 1024.0,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Final mixer of splitmix64: spreads FNV's weak low bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The affinity key of a prompt: a hash chained over its full 64-token blocks within the first
/// `prefix_tokens` tokens; `None` when the prompt has no full block. Stable across runs and builds.
pub fn prefix_hash(tokens: &[u32], prefix_tokens: u32) -> Option<u64> {
    let usable = tokens.len().min(prefix_tokens as usize);
    let blocks = usable / BLOCK_TOKENS as usize;
    if blocks == 0 {
        return None;
    }
    let mut h = FNV_OFFSET;
    for block in tokens[..blocks * BLOCK_TOKENS as usize].chunks(BLOCK_TOKENS as usize) {
        let mut block_hash = FNV_OFFSET;
        for t in block {
            block_hash = fnv1a(block_hash, &t.to_le_bytes());
        }
        h = mix64(h ^ block_hash);
    }
    Some(h)
}

/// Cache-aware policy.
#[derive(Debug, Clone)]
pub struct CacheAware {
    config: CacheAwareConfig,
}

impl CacheAware {
    /// A cache-aware policy.
    pub fn new(config: CacheAwareConfig) -> Self {
        CacheAware { config }
    }

    /// The instance preferred for `key` among the healthy views (rendezvous hashing).
    fn preferred(&self, instances: &[InstanceView], key: u64) -> Option<usize> {
        instances
            .iter()
            .enumerate()
            .filter(|(_, v)| v.healthy)
            .max_by_key(|(_, v)| mix64(key ^ fnv1a(FNV_OFFSET, v.id.as_bytes())))
            .map(|(i, _)| i)
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn select(
        &self,
        instances: &[InstanceView],
        request: &RequestFeatures<'_>,
        _rng: &mut dyn RngCore,
    ) -> Option<usize> {
        let w = self.config.kv_weight_tokens;
        let least = least_loaded(instances, w)?;
        let Some(key) = prefix_hash(request.prompt_token_ids, self.config.prefix_tokens) else {
            return Some(least);
        };
        let preferred = self.preferred(instances, key)?;
        let min_load = load_score(&instances[least], w);
        let load = load_score(&instances[preferred], w);
        let imbalanced = load - min_load > self.config.balance_abs_tokens as f64
            && load > self.config.balance_rel * min_load;
        Some(if imbalanced { least } else { preferred })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn views(n: usize) -> Vec<InstanceView> {
        (0..n)
            .map(|i| InstanceView::idle(&format!("p{i}")))
            .collect()
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| seed.wrapping_mul(7919).wrapping_add(i))
            .collect()
    }

    fn pick(policy: &CacheAware, views: &[InstanceView], tokens: &[u32]) -> Option<usize> {
        let req = RequestFeatures {
            seq: 0,
            prompt_token_ids: tokens,
        };
        policy.select(views, &req, &mut StdRng::seed_from_u64(0))
    }

    #[test]
    fn the_key_covers_only_whole_blocks_of_the_prefix() {
        let a = prompt(1, 300);
        let mut b = a.clone();
        b[299] = 0; // beyond the 256-token prefix
        assert_eq!(prefix_hash(&a, 256), prefix_hash(&b, 256));
        b[10] = 0;
        assert_ne!(prefix_hash(&a, 256), prefix_hash(&b, 256));
        assert_eq!(prefix_hash(&a[..63], 256), None);
        // 100 tokens = one full block: the partial second block is not part of the key.
        assert_eq!(prefix_hash(&a[..100], 256), prefix_hash(&a[..64], 256));
    }

    #[test]
    fn a_shared_prefix_pins_requests_to_one_instance() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let mut views = views(4);
        let base = prompt(5, 256);
        let first = pick(&policy, &views, &base).unwrap();
        for suffix in 0..20u32 {
            let mut p = base.clone();
            p.extend([suffix, suffix + 1]);
            // Moderate load on the pinned instance does not break affinity.
            views[first].inflight_tokens += 100;
            assert_eq!(pick(&policy, &views, &p), Some(first));
        }
    }

    #[test]
    fn different_prefixes_spread_over_instances() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let views = views(4);
        let mut counts = [0usize; 4];
        for s in 0..200 {
            counts[pick(&policy, &views, &prompt(s, 128)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 20), "{counts:?}");
    }

    #[test]
    fn the_imbalance_guard_falls_back_to_least_load() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let mut views = views(3);
        let p = prompt(9, 128);
        let preferred = pick(&policy, &views, &p).unwrap();
        // Over the absolute gap (4096) and over 1.5× the minimum → least loaded wins.
        views[preferred].queued_prompt_tokens = 10_000;
        for (i, v) in views.iter_mut().enumerate() {
            if i != preferred {
                v.queued_prompt_tokens = 1_000 + i as u64;
            }
        }
        let fallback = pick(&policy, &views, &p).unwrap();
        assert_ne!(fallback, preferred);
        assert_eq!(
            views[fallback].queued_prompt_tokens,
            views
                .iter()
                .filter(|v| v.id != views[preferred].id)
                .map(|v| v.queued_prompt_tokens)
                .min()
                .unwrap()
        );
        // A big absolute gap but a small ratio keeps affinity.
        for (i, v) in views.iter_mut().enumerate() {
            if i != preferred {
                v.queued_prompt_tokens = 9_000;
            }
        }
        views[preferred].queued_prompt_tokens = 13_200;
        assert_eq!(pick(&policy, &views, &p), Some(preferred));
    }

    #[test]
    fn losing_the_preferred_instance_moves_only_its_keys() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let mut views = views(4);
        let before: Vec<_> = (0..100)
            .map(|s| pick(&policy, &views, &prompt(s, 64)).unwrap())
            .collect();
        views[2].healthy = false;
        for (s, &b) in before.iter().enumerate() {
            let after = pick(&policy, &views, &prompt(s as u32, 64)).unwrap();
            if b != 2 {
                assert_eq!(after, b, "key {s} moved although its instance is healthy");
            } else {
                assert_ne!(after, 2);
            }
        }
    }

    #[test]
    fn short_prompts_go_to_the_least_loaded() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let mut views = views(3);
        views[0].queued_prompt_tokens = 50;
        views[1].queued_prompt_tokens = 10;
        views[2].queued_prompt_tokens = 30;
        assert_eq!(pick(&policy, &views, &prompt(1, 20)), Some(1));
    }
}
