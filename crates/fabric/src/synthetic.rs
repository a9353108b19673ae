//! Seeded synthetic routings, for `pdserve sim step`, the docs and tests.
//!
//! Every token scores every routed expert with a seeded random key and picks its `top_k` experts
//! the way DeepSeek-V3's `noaux_tc` gate does: with group limiting, a group's score is the sum of
//! its two best keys, the `topk_group` best groups are kept and the `top_k` best experts among them
//! are chosen. [`RoutingKind::Uniform`] skips the group limit; [`RoutingKind::Skewed`] adds
//! `ln w_e` to each key (Gumbel-top-k sampling, so experts are drawn in proportion to `w_e`), with
//! Zipf weights `w = 1 / rank^exponent` over a seeded permutation of the experts.
//!
//! Determinism: the generator is ChaCha8 seeded with the seed, on stream `layer`, so the same
//! (seed, layer, batch) always gives the same routing, on every platform.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::FabricError;
use crate::routing::LayerRouting;
use crate::shape::ModelShape;

/// How synthetic tokens choose experts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum RoutingKind {
    /// `top_k` distinct experts uniformly at random; no group limit.
    Uniform,
    /// DeepSeek-V3's group-limited routing with random scores: `topk_group` of `n_group` groups.
    NodeLimited,
    /// "Absolutely balanced" (as DeepSeek's profiles simulate): global token `t` of layer `l`
    /// chooses experts `(t + l + j·S) mod n_experts`, `j < top_k`, with stride
    /// `S = n_experts / top_k`: one expert in each of `top_k` evenly spaced blocks (no group limit),
    /// and expert `e` serves the tokens with `t + l ≡ e (mod S)`, so every expert receives the
    /// same load whenever the tokens cover the residues evenly. No randomness.
    Balanced,
    /// Group-limited routing with Zipf-skewed expert popularity.
    Skewed {
        /// Zipf exponent (0 = uniform; 1 = the hottest expert twice as popular as the second).
        exponent: f64,
    },
}

/// A synthetic router for one model shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticRouting {
    n_experts: usize,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    kind: RoutingKind,
}

impl SyntheticRouting {
    /// A router with the shape's experts, top-k and groups.
    pub fn for_shape(shape: &ModelShape, kind: RoutingKind) -> Result<Self, FabricError> {
        if !shape.is_moe() {
            return Err(FabricError::invalid(
                "routing",
                "n_routed_experts",
                "the modeled shape has no routed experts",
            ));
        }
        Self::new(
            shape.n_routed_experts as usize,
            shape.num_experts_per_tok as usize,
            shape.n_group as usize,
            shape.topk_group as usize,
            kind,
        )
    }

    /// A router over `n_experts` in `n_group` equal groups.
    pub fn new(
        n_experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        kind: RoutingKind,
    ) -> Result<Self, FabricError> {
        if n_experts == 0 || n_experts > usize::from(u16::MAX) {
            return Err(FabricError::invalid(
                "routing",
                "n_experts",
                "must be in 1..=65535",
            ));
        }
        if n_group == 0
            || !n_experts.is_multiple_of(n_group)
            || topk_group == 0
            || topk_group > n_group
        {
            return Err(FabricError::invalid(
                "routing",
                "n_group",
                format!("{n_group} groups / {topk_group} kept do not fit {n_experts} experts"),
            ));
        }
        if top_k == 0 || top_k > n_experts / n_group * topk_group {
            return Err(FabricError::invalid(
                "routing",
                "top_k",
                format!("{top_k} experts cannot be chosen from {topk_group} groups"),
            ));
        }
        if let RoutingKind::Skewed { exponent } = kind
            && !(exponent.is_finite() && exponent >= 0.0)
        {
            return Err(FabricError::invalid(
                "routing",
                "skew_exponent",
                format!("must be zero or positive, got {exponent}"),
            ));
        }
        Ok(Self {
            n_experts,
            top_k,
            n_group,
            topk_group,
            kind,
        })
    }

    /// Routed experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// One layer's routing for a batch with `tokens_per_rank[r]` tokens on rank `r`.
    pub fn generate(
        &self,
        tokens_per_rank: &[u32],
        seed: u64,
        layer: u64,
    ) -> Result<LayerRouting, FabricError> {
        let total: usize = tokens_per_rank.iter().map(|&t| t as usize).sum();
        let mut experts = Vec::with_capacity(total * self.top_k);
        if self.kind == RoutingKind::Balanced {
            let stride = (self.n_experts / self.top_k).max(1);
            for t in 0..total {
                let base = t + layer as usize;
                for j in 0..self.top_k {
                    experts.push(((base + j * stride) % self.n_experts) as u16);
                }
            }
            return LayerRouting::new(self.top_k, tokens_per_rank, experts);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(layer);
        let log_weights = self.log_weights(&mut rng);
        let mut keys = vec![0.0f64; self.n_experts];
        let mut chosen = Vec::with_capacity(self.top_k + 1);
        let mut groups = Vec::with_capacity(self.n_group);
        for _ in 0..total {
            self.draw_keys(&mut rng, log_weights.as_deref(), &mut keys);
            self.pick(&keys, &mut groups, &mut chosen);
            experts.extend(chosen.iter().map(|&e| e as u16));
        }
        LayerRouting::new(self.top_k, tokens_per_rank, experts)
    }

    /// `n_layers` layers of routing with the same seed (streams `0..n_layers`).
    pub fn generate_layers(
        &self,
        tokens_per_rank: &[u32],
        seed: u64,
        n_layers: usize,
    ) -> Result<Vec<LayerRouting>, FabricError> {
        (0..n_layers as u64)
            .map(|l| self.generate(tokens_per_rank, seed, l))
            .collect()
    }

    fn log_weights(&self, rng: &mut ChaCha8Rng) -> Option<Vec<f64>> {
        let RoutingKind::Skewed { exponent } = self.kind else {
            return None;
        };
        // A seeded permutation decides which experts are hot in this layer.
        let mut order: Vec<usize> = (0..self.n_experts).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let mut w = vec![0.0; self.n_experts];
        for (rank, &e) in order.iter().enumerate() {
            w[e] = -exponent * ((rank + 1) as f64).ln();
        }
        Some(w)
    }

    fn draw_keys(&self, rng: &mut ChaCha8Rng, log_weights: Option<&[f64]>, keys: &mut [f64]) {
        match log_weights {
            None => {
                for k in keys.iter_mut() {
                    *k = f64::from(rng.random::<u32>());
                }
            }
            Some(lw) => {
                for (k, w) in keys.iter_mut().zip(lw) {
                    // Gumbel(0, 1) = -ln(-ln U), U in (0, 1).
                    let u = (f64::from(rng.random::<u32>()) + 0.5) / 4_294_967_296.0;
                    *k = w - (-u.ln()).ln();
                }
            }
        }
    }

    fn pick(&self, keys: &[f64], groups: &mut Vec<(f64, usize)>, chosen: &mut Vec<usize>) {
        chosen.clear();
        let limited = matches!(
            self.kind,
            RoutingKind::NodeLimited | RoutingKind::Skewed { .. }
        ) && self.topk_group < self.n_group;
        if !limited {
            top_k_into(keys, 0..keys.len(), self.top_k, chosen);
            return;
        }
        let group_size = self.n_experts / self.n_group;
        groups.clear();
        for g in 0..self.n_group {
            let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for &k in &keys[g * group_size..(g + 1) * group_size] {
                if k > a {
                    b = a;
                    a = k;
                } else if k > b {
                    b = k;
                }
            }
            let second = if b.is_finite() { b } else { 0.0 };
            groups.push((a + second, g));
        }
        // The best `topk_group` groups (ties: lower index), then visited in ascending order so
        // that equal keys keep preferring the lower expert id.
        groups.sort_unstable_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        groups.truncate(self.topk_group);
        groups.sort_unstable_by_key(|&(_, g)| g);
        for &(_, g) in groups.iter() {
            top_k_into(
                keys,
                g * group_size..(g + 1) * group_size,
                self.top_k,
                chosen,
            );
        }
    }
}

/// The `k` indices with the largest keys (ties: lower index), best first.
fn top_k_into(
    keys: &[f64],
    candidates: impl Iterator<Item = usize>,
    k: usize,
    out: &mut Vec<usize>,
) {
    for i in candidates {
        let key = keys[i];
        if out.len() == k && keys[out[k - 1]] >= key {
            continue;
        }
        let pos = out.iter().position(|&j| keys[j] < key).unwrap_or(out.len());
        if out.len() == k {
            out.pop();
        }
        out.insert(pos.min(out.len()), i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(kind: RoutingKind) -> SyntheticRouting {
        SyntheticRouting::new(256, 8, 8, 4, kind).unwrap()
    }

    #[test]
    fn node_limited_tokens_use_at_most_four_groups() {
        let r = v3(RoutingKind::NodeLimited)
            .generate(&[64, 64], 7, 0)
            .unwrap();
        for rank in 0..2 {
            for token in r.experts_of(rank, 0..64).chunks(8) {
                let mut groups: Vec<u16> = token.iter().map(|e| e / 32).collect();
                groups.sort_unstable();
                groups.dedup();
                assert!(groups.len() <= 4, "{token:?}");
            }
        }
    }

    #[test]
    fn uniform_tokens_spread_over_more_groups_than_node_limited_ones() {
        let groups = |kind| {
            let r = v3(kind).generate(&[512], 3, 0).unwrap();
            r.experts_of(0, 0..512)
                .chunks(8)
                .map(|t| {
                    let mut g: Vec<u16> = t.iter().map(|e| e / 32).collect();
                    g.sort_unstable();
                    g.dedup();
                    g.len()
                })
                .sum::<usize>()
        };
        assert!(groups(RoutingKind::Uniform) > groups(RoutingKind::NodeLimited));
    }

    #[test]
    fn the_same_seed_gives_the_same_routing_and_another_seed_does_not() {
        let g = v3(RoutingKind::Skewed { exponent: 1.0 });
        assert_eq!(
            g.generate(&[16, 3], 11, 2).unwrap(),
            g.generate(&[16, 3], 11, 2).unwrap()
        );
        assert_ne!(
            g.generate(&[16, 3], 11, 2).unwrap(),
            g.generate(&[16, 3], 12, 2).unwrap()
        );
        assert_ne!(
            g.generate(&[16, 3], 11, 2).unwrap(),
            g.generate(&[16, 3], 11, 3).unwrap()
        );
    }

    #[test]
    fn skewed_routing_concentrates_on_hot_experts() {
        let count_top = |kind| {
            let r = v3(kind).generate(&[2048], 5, 0).unwrap();
            let mut counts = vec![0usize; 256];
            for &e in r.experts_of(0, 0..2048) {
                counts[usize::from(e)] += 1;
            }
            counts.sort_unstable_by(|a, b| b.cmp(a));
            counts[..8].iter().sum::<usize>()
        };
        assert!(
            count_top(RoutingKind::Skewed { exponent: 1.2 })
                > 2 * count_top(RoutingKind::NodeLimited)
        );
    }

    #[test]
    fn balanced_routing_loads_every_expert_equally() {
        let r = v3(RoutingKind::Balanced).generate(&[64; 8], 0, 3).unwrap();
        let mut counts = vec![0usize; 256];
        for &e in r.experts_of(0, 0..64).iter().chain(r.experts_of(7, 0..64)) {
            counts[usize::from(e)] += 1;
        }
        assert!(counts.iter().all(|&c| c == 4), "{counts:?}");
    }

    #[test]
    fn chosen_experts_are_distinct() {
        let r = v3(RoutingKind::Uniform).generate(&[300], 1, 0).unwrap();
        assert!(r.validate(256, "routing").is_ok());
    }
}
