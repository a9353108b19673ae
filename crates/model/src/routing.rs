//! The MoE gate: scores, group-limited top-k selection, weights — and the routing record.
//!
//! DeepSeek-V3 (`topk_method: noaux_tc`, `scoring_func: sigmoid`), per token:
//! 1. `s = sigmoid(h · W_gateᵀ)` over the routed experts;
//! 2. selection scores `s + e_score_correction_bias` (the bias steers selection only);
//! 3. group score = sum of the two best selection scores of each of `n_group` groups; keep the
//!    `topk_group` best groups (node-limited routing: a token reaches at most that many nodes);
//! 4. the `num_experts_per_tok` best selection scores among the kept groups' experts;
//! 5. weights = the unbiased `s` of the chosen experts, divided by their sum when
//!    `norm_topk_prob`, times `routed_scaling_factor`.
//!
//! Excluded groups are masked to −∞ as in DeepSeek's reference (transformers masks them to 0.0,
//! which differs only if fewer than `top_k` kept experts have a positive biased score).
//! V2-style `softmax` scoring, `group_limited_greedy` (group score = max score) and `greedy` (no
//! groups) are supported too. Ties break toward the lower expert id.
//!
//! The selection runs on the host over plain slices: it is a few hundred comparisons per token,
//! and the result ([`Routing`]) is needed on the host anyway — by the experts (to group tokens)
//! and by the caller (the EP runtime and the fabric replay the real routing of every layer).

use candle_core::{Device, Tensor};

use crate::config::{MoeSpec, ScoringFunc, TopkMethod};
use crate::error::{ModelError, Result};

/// Routing of `n` tokens in one MoE layer: `top_k` expert ids and weights per token, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// `[n × top_k]` routed expert ids (global ids, `0..n_routed_experts`), best first.
    pub ids: Vec<u32>,
    /// `[n × top_k]` weights (normalized and scaled), aligned with `ids`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Expert ids of token `t` (empty when `t` is out of range).
    pub fn ids_of(&self, t: usize) -> &[u32] {
        self.ids
            .get(t * self.top_k..(t + 1) * self.top_k)
            .unwrap_or(&[])
    }

    /// Weights of token `t` (empty when `t` is out of range).
    pub fn weights_of(&self, t: usize) -> &[f32] {
        self.weights
            .get(t * self.top_k..(t + 1) * self.top_k)
            .unwrap_or(&[])
    }

    /// Ids as a `[n, top_k]` u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.ids,
            (self.tokens(), self.top_k),
            device,
        )?)
    }

    /// Weights as a `[n, top_k]` f32 tensor.
    pub fn weights_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.weights,
            (self.tokens(), self.top_k),
            device,
        )?)
    }

    /// Tokens sent to each of `n_experts` experts (the expert load of this layer).
    pub fn expert_counts(&self, n_experts: usize) -> Vec<usize> {
        let mut counts = vec![0; n_experts];
        for &id in &self.ids {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// The gate of one MoE layer.
#[derive(Debug, Clone)]
pub struct Gate {
    /// `[n_routed_experts, hidden]`.
    weight: Tensor,
    /// `e_score_correction_bias` (noaux_tc only).
    bias: Option<Vec<f32>>,
    spec: MoeSpec,
}

impl Gate {
    /// A gate from its weight `[n_routed_experts, hidden]` and optional correction bias.
    pub fn new(weight: Tensor, bias: Option<Vec<f32>>, spec: MoeSpec) -> Self {
        Self { weight, bias, spec }
    }

    /// Routes `hidden` `[n, hidden]`.
    pub fn route(&self, hidden: &Tensor) -> Result<Routing> {
        let logits = hidden.matmul(&self.weight.t()?)?;
        let n = logits.dim(0)?;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        route_logits(&flat, n, self.bias.as_deref(), &self.spec)
    }
}

/// Routes `n` tokens from their gate logits (`[n × n_routed_experts]`, row-major).
pub fn route_logits(
    logits: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    spec: &MoeSpec,
) -> Result<Routing> {
    let e = spec.n_routed_experts;
    if logits.len() != n * e {
        return Err(ModelError::Input(format!(
            "gate logits hold {} values, expected {n} × {e}",
            logits.len()
        )));
    }
    if let Some(b) = bias
        && b.len() != e
    {
        return Err(ModelError::Input(format!(
            "correction bias has {} values, expected {e}",
            b.len()
        )));
    }
    let mut ids = Vec::with_capacity(n * spec.top_k);
    let mut weights = Vec::with_capacity(n * spec.top_k);
    let mut scores = vec![0f32; e];
    let mut choice = vec![0f32; e];
    for row in logits.chunks_exact(e) {
        score_row(row, spec.scoring, &mut scores);
        for (i, c) in choice.iter_mut().enumerate() {
            *c = scores[i] + bias.map_or(0.0, |b| b[i]);
        }
        let chosen = select_row(&scores, &choice, spec);
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        if spec.norm_topk_prob {
            let denominator: f32 = w.iter().sum::<f32>() + 1e-20;
            for x in &mut w {
                *x /= denominator;
            }
        }
        let scale = spec.routed_scaling_factor as f32;
        ids.extend(chosen.iter().map(|&i| i as u32));
        weights.extend(w.iter().map(|x| x * scale));
    }
    Ok(Routing {
        top_k: spec.top_k,
        ids,
        weights,
    })
}

fn score_row(row: &[f32], scoring: ScoringFunc, out: &mut [f32]) {
    match scoring {
        ScoringFunc::Sigmoid => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = 1.0 / (1.0 + (-x).exp());
            }
        }
        ScoringFunc::Softmax => {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &x) in out.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            for o in out.iter_mut() {
                *o /= sum;
            }
        }
    }
}

/// Indices of the `k` largest values of `values` restricted to `allowed`, best first, ties to
/// the lower index. Partial selection: O(n) plus a sort of the `k` chosen.
fn top_indices(values: &[f32], k: usize, allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).filter(|&i| allowed(i)).collect();
    let better = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < idx.len() {
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, better);
        }
        idx.truncate(k);
    }
    idx.sort_unstable_by(better);
    idx
}

/// Sum of the two largest values (the only group statistic `noaux_tc` needs).
fn top2_sum(values: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in values {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    if values.len() < 2 { a } else { a + b }
}

fn select_row(scores: &[f32], choice: &[f32], spec: &MoeSpec) -> Vec<usize> {
    if spec.method == TopkMethod::Greedy || spec.n_group <= 1 {
        return top_indices(choice, spec.top_k, |_| true);
    }
    let per_group = spec.n_routed_experts / spec.n_group;
    let group_scores: Vec<f32> = (0..spec.n_group)
        .map(|g| {
            let range = g * per_group..(g + 1) * per_group;
            match spec.method {
                TopkMethod::NoauxTc => top2_sum(&choice[range]),
                _ => scores[range]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max),
            }
        })
        .collect();
    let groups = top_indices(&group_scores, spec.topk_group, |_| true);
    let mut kept = vec![false; spec.n_group];
    for g in groups {
        kept[g] = true;
    }
    top_indices(choice, spec.top_k, |i| kept[i / per_group])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_spec() -> MoeSpec {
        MoeSpec {
            n_routed_experts: 16,
            top_k: 4,
            n_group: 4,
            topk_group: 2,
            expert_intermediate: 8,
            shared_intermediate: 8,
            scoring: ScoringFunc::Sigmoid,
            method: TopkMethod::NoauxTc,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        }
    }

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn selection_stays_within_the_best_groups() {
        // Group 0 has one excellent expert but a poor runner-up; groups 1 and 2 have two good ones.
        let mut probs = [0.1f32; 16];
        probs[0] = 0.95;
        probs[4] = 0.6;
        probs[5] = 0.6;
        probs[8] = 0.7;
        probs[9] = 0.65;
        let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
        let r = route_logits(&logits, 1, None, &v3_spec()).unwrap();
        // Group sums: g0 = 1.05, g1 = 1.2, g2 = 1.35 → groups 1 and 2; expert 0 is excluded.
        assert_eq!(r.ids, vec![8, 9, 4, 5]);
        let total: f32 = r.weights.iter().sum();
        assert!((total - 2.5).abs() < 1e-5);
    }

    #[test]
    fn bias_steers_selection_but_not_weights() {
        let probs = [
            0.9f32, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2,
        ];
        let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
        let mut bias = vec![0f32; 16];
        bias[3] = 0.5; // lifts expert 3 above 1 and 2 for selection
        let r = route_logits(&logits, 1, Some(&bias), &v3_spec()).unwrap();
        assert!(r.ids.contains(&3));
        let i = r.ids.iter().position(|&x| x == 3).unwrap();
        let chosen_sum: f32 = r.ids.iter().map(|&x| probs[x as usize]).sum();
        assert!((r.weights[i] - 0.6 / chosen_sum * 2.5).abs() < 1e-5);
    }

    #[test]
    fn softmax_greedy_picks_global_top_k_without_normalizing() {
        let spec = MoeSpec {
            n_group: 1,
            topk_group: 1,
            scoring: ScoringFunc::Softmax,
            method: TopkMethod::Greedy,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            ..v3_spec()
        };
        let logits: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let r = route_logits(&logits, 1, None, &spec).unwrap();
        assert_eq!(r.ids, vec![15, 14, 13, 12]);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((r.weights[0] - 1.5f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn expert_counts_sum_to_assignments() {
        let logits: Vec<f32> = (0..48)
            .map(|i| ((i * 7919) % 13) as f32 * 0.3 - 2.0)
            .collect();
        let r = route_logits(&logits, 3, None, &v3_spec()).unwrap();
        assert_eq!(r.tokens(), 3);
        assert_eq!(r.expert_counts(16).iter().sum::<usize>(), 12);
    }
}
