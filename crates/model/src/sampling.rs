//! Token sampling: greedy, temperature, top-k, top-p, seeded; logprobs of the chosen and top tokens.
//!
//! [`sample_with_uniform`] is the pure core: logits, parameters and one uniform number in
//! `[0, 1)` in, a [`SampledToken`] out. [`Sampler`] wraps it with a request's seed: the token at
//! output index `k` uses **draw `k`** of the request's stream ([`draw_uniform`]`(seed, k)`, the
//! `k`-th number of a SplitMix64 generator seeded with `seed`), whatever sampled the tokens
//! before it. So a seeded request produces the same tokens however it is batched, scheduled or
//! split between instances (a prefill instance samples index 0, a decode instance continues at
//! index 1), and a speculative decoder that samples the target token at each index reproduces
//! non-speculative output.
//!
//! `min_tokens`: while the output index is below [`SamplingParams::min_tokens`], the ids in
//! [`SamplingParams::suppressed_token_ids`] (the end-of-sequence and stop token ids the request
//! would stop on) get probability 0 ([`SamplingParams::masked_logits`]). Masking that would leave
//! no token is not applied.
//!
//! Order of operations (as vLLM and transformers): temperature, then top-k, then top-p over the
//! renormalized remainder; `temperature == 0` (or `top_k == 1`) is greedy (ties → lowest id).
//! Reported logprobs are those of the model's unmodified distribution (`log_softmax(logits)`),
//! as vLLM reports by default, so they do not depend on the sampling knobs (nor on the
//! `min_tokens` mask).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;

/// Most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-request sampling knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 = off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Seed of the request's generator (`None`: the caller's fallback seed).
    pub seed: Option<u64>,
    /// Return this many top logprobs per token (`Some(0)`: only the chosen token's).
    pub logprobs: Option<usize>,
    /// Output index below which `suppressed_token_ids` are never sampled (the request's
    /// `min_tokens`); 0 = off.
    pub min_tokens: usize,
    /// Token ids masked while the output index is below `min_tokens`: the end-of-sequence and
    /// stop token ids the request would stop on.
    pub suppressed_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            logprobs: None,
            min_tokens: 0,
            suppressed_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Input(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(ModelError::Input(format!(
                "logprobs must be at most {MAX_TOP_LOGPROBS}, got {:?}",
                self.logprobs
            )));
        }
        Ok(())
    }

    /// Whether sampling is deterministic argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The logits to sample output index `index` from: `logits` with `suppressed_token_ids` set to
    /// `-inf` while `index < min_tokens` (ids beyond the vocabulary are ignored); `logits` itself
    /// otherwise, or when the mask would leave no finite logit.
    pub fn masked_logits<'a>(&self, logits: &'a [f32], index: usize) -> Cow<'a, [f32]> {
        if index >= self.min_tokens || self.suppressed_token_ids.is_empty() {
            return Cow::Borrowed(logits);
        }
        let mut masked = logits.to_vec();
        for &id in &self.suppressed_token_ids {
            if let Some(l) = masked.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if masked.iter().all(|l| *l == f32::NEG_INFINITY) {
            return Cow::Borrowed(logits);
        }
        Cow::Owned(masked)
    }
}

/// SplitMix64's state increment per draw.
const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Draw `index` of the stream seeded with `seed`: the `index`-th uniform (0-based) of
/// `SplitMix64::new(seed)`, in `[0, 1)`, computed directly (SplitMix64's state after `index` draws
/// is `seed + index × γ`).
pub fn draw_uniform(seed: u64, index: u64) -> f64 {
    SplitMix64::new(seed.wrapping_add(index.wrapping_mul(SPLITMIX_GAMMA))).uniform()
}

/// A sampled token and its log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    /// Token id.
    pub id: u32,
    /// `log p(id)` under the unmodified distribution (present when logprobs were requested).
    pub logprob: Option<f32>,
    /// The most likely tokens and their logprobs, best first (empty unless requested).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A request's sampler: parameters plus its seed; output index `k` uses draw `k`.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    next_index: usize,
}

impl Sampler {
    /// A sampler for `params`; `fallback_seed` seeds it when `params.seed` is `None`.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            seed: params.seed.unwrap_or(fallback_seed),
            params,
            next_index: 0,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed of the draws.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Samples output index `index` from `logits` with draw `index` (greedy parameters ignore the
    /// draw), after the `min_tokens` mask; logprobs are of the unmasked `logits`.
    pub fn sample_at(&self, logits: &[f32], index: usize) -> Result<SampledToken> {
        let u = draw_uniform(self.seed, index as u64);
        let masked = self.params.masked_logits(logits, index);
        sample_parts(&masked, logits, &self.params, u)
    }

    /// Samples the next output index (0 for the first call, then 1, 2, …): for callers that
    /// sample every token of a request in order.
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken> {
        let t = self.sample_at(logits, self.next_index)?;
        self.next_index += 1;
        Ok(t)
    }
}

fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[i]` computed stably, for a few indices.
fn log_softmax_at(logits: &[f32], max: f32, indices: impl Iterator<Item = usize>) -> Vec<f32> {
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    indices
        .map(|i| logits.get(i).map_or(f32::NEG_INFINITY, |&l| l - lse))
        .collect()
}

/// Samples from `logits` with `params`, using `uniform` ∈ `[0, 1)` as the only randomness (no
/// `min_tokens` mask: see [`Sampler::sample_at`]).
pub fn sample_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    uniform: f64,
) -> Result<SampledToken> {
    sample_parts(logits, logits, params, uniform)
}

/// Picks the token from `choose_from` and reports logprobs of `report_from` (same vocabulary).
fn sample_parts(
    choose_from: &[f32],
    report_from: &[f32],
    params: &SamplingParams,
    uniform: f64,
) -> Result<SampledToken> {
    if choose_from.is_empty() || choose_from.len() != report_from.len() {
        return Err(ModelError::Input("sampling from empty logits".into()));
    }
    if report_from.iter().any(|x| x.is_nan()) {
        return Err(ModelError::Input("logits contain NaN".into()));
    }
    let id = if params.is_greedy() {
        argmax(choose_from)
    } else {
        sample_filtered(choose_from, params, uniform)
    };
    Ok(token_logprobs(report_from, id as u32, params.logprobs))
}

/// `id` with its logprob and the `top` most likely tokens of `logits` (best first, lowest id on
/// ties) when `top` is `Some`; without logprobs when it is `None`.
pub fn token_logprobs(logits: &[f32], id: u32, top: Option<usize>) -> SampledToken {
    let id = id as usize;
    let (logprob, top_logprobs) = match top {
        None => (None, Vec::new()),
        Some(n) => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            let n = n.min(logits.len());
            let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            if n > 0 && n < order.len() {
                order.select_nth_unstable_by(n - 1, by_logit);
            }
            order.truncate(n);
            order.sort_by(by_logit);
            let lp = log_softmax_at(
                logits,
                max,
                std::iter::once(id).chain(order.iter().copied()),
            );
            let top = order
                .iter()
                .zip(&lp[1..])
                .map(|(&i, &l)| (i as u32, l))
                .collect();
            (Some(lp[0]), top)
        }
    };
    SampledToken {
        id: id as u32,
        logprob,
        top_logprobs,
    }
}

fn sample_filtered(logits: &[f32], params: &SamplingParams, uniform: f64) -> usize {
    let inv_t = 1.0 / params.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    // Candidates (id, weight ∝ exp((l - max)/T)), best first when a cut is needed.
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) * inv_t).exp()))
        .collect();
    let by_weight = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, by_weight);
        cand.truncate(params.top_k);
    }
    if params.top_p < 1.0 {
        cand.sort_unstable_by(by_weight);
        let total: f64 = cand.iter().map(|c| c.1).sum();
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1;
            if acc >= params.top_p as f64 * total {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    } else {
        cand.sort_unstable_by_key(|c| c.0);
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    let target = uniform * total;
    let mut acc = 0.0;
    for c in &cand {
        acc += c.1;
        if target < acc {
            return c.0;
        }
    }
    // Rounding put the target at the very end: the last candidate that can be drawn.
    cand.iter()
        .rev()
        .find(|c| c.1 > 0.0)
        .or(cand.last())
        .map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(1),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_argmax_with_lowest_id_on_ties() {
        let t =
            sample_with_uniform(&[0.1, 2.0, 2.0, -1.0], &SamplingParams::greedy(), 0.99).unwrap();
        assert_eq!(t.id, 1);
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let logits = [3.0, 2.9, 2.8, 0.0, 0.0, 0.0];
        for i in 0..200 {
            let u = i as f64 / 200.0;
            let t = sample_with_uniform(&logits, &params(5.0, 2, 1.0), u).unwrap();
            assert!(t.id < 2);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        // probabilities 0.5, 0.3, 0.2 at T = 1: top_p 0.6 keeps ids 0 and 1 only.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut seen = [0usize; 3];
        for i in 0..1000 {
            let t = sample_with_uniform(&logits, &params(1.0, 0, 0.6), i as f64 / 1000.0).unwrap();
            seen[t.id as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        // Renormalized: 0.5/0.8 of the draws go to id 0.
        assert!((seen[0] as f64 / 1000.0 - 0.625).abs() < 0.01);
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = Sampler::new(params(1.0, 0, 1.0), 0).unwrap();
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits).unwrap().id as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            assert!((c as f64 / n as f64 - p).abs() < 0.015, "id {i}: {c}");
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut p = params(0.8, 0, 0.95);
            p.seed = Some(seed);
            let mut s = Sampler::new(p, 0).unwrap();
            (0..20)
                .map(|_| s.sample(&logits).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn logprobs_are_of_the_unmodified_distribution() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut p = params(0.0, 0, 1.0);
        p.logprobs = Some(2);
        let t = sample_with_uniform(&logits, &p, 0.5).unwrap();
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert_eq!(t.id, 1);
        assert!((t.logprob.unwrap() - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(
            t.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(Sampler::new(params(-1.0, 0, 1.0), 0).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0), 0).is_err());
        assert!(sample_with_uniform(&[f32::NAN], &SamplingParams::greedy(), 0.0).is_err());
    }

    #[test]
    fn token_k_uses_draw_k_of_the_seeded_stream() {
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7) % 13) as f32 * 0.25).collect();
        let p = params(1.0, 0, 1.0);
        // draw_uniform(seed, k) is the k-th number of the sequential generator.
        let mut g = SplitMix64::new(1);
        for k in 0..8 {
            assert_eq!(draw_uniform(1, k), g.uniform());
        }
        // Sampling index k alone (a decode instance continuing at 1) equals sampling 0..=k in
        // order (one engine).
        let mut in_order = Sampler::new(p.clone(), 0).unwrap();
        let sequential: Vec<u32> = (0..8)
            .map(|_| in_order.sample(&logits).unwrap().id)
            .collect();
        let fresh = Sampler::new(p.clone(), 0).unwrap();
        for k in (0..8).rev() {
            let t = fresh.sample_at(&logits, k).unwrap();
            assert_eq!(t.id, sequential[k]);
            let u = draw_uniform(1, k as u64);
            assert_eq!(t, sample_with_uniform(&logits, &p, u).unwrap());
        }
    }

    #[test]
    fn consecutive_draws_are_not_correlated() {
        // Lag-1 correlation of 20 000 consecutive draws of one stream is ≈ 0 (|r| < 0.03 with
        // overwhelming probability for independent uniforms; deterministic for this seed).
        let n = 20_000u64;
        let u: Vec<f64> = (0..n).map(|k| draw_uniform(42, k)).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        let var: f64 = u.iter().map(|x| (x - mean).powi(2)).sum();
        let cov: f64 = u.windows(2).map(|w| (w[0] - mean) * (w[1] - mean)).sum();
        assert!((cov / var).abs() < 0.03, "lag-1 correlation {}", cov / var);
        assert!((mean - 0.5).abs() < 0.01);
    }

    #[test]
    fn suppressed_ids_are_never_sampled_below_min_tokens() {
        // Token 2 (an EOS) dominates; below min_tokens it is masked, from min_tokens on it returns.
        let logits = [0.0f32, 0.5, 9.0, 0.2];
        let mut p = params(1.0, 0, 1.0);
        p.min_tokens = 3;
        p.suppressed_token_ids = vec![2, 99];
        p.logprobs = Some(1);
        let s = Sampler::new(p.clone(), 0).unwrap();
        for k in 0..3 {
            for seed_shift in 0..50 {
                let mut q = p.clone();
                q.seed = Some(seed_shift);
                let t = Sampler::new(q, 0).unwrap().sample_at(&logits, k).unwrap();
                assert_ne!(t.id, 2, "index {k}");
            }
        }
        let greedy = SamplingParams {
            temperature: 0.0,
            ..p.clone()
        };
        let g = Sampler::new(greedy, 0).unwrap();
        assert_eq!(g.sample_at(&logits, 2).unwrap().id, 1);
        assert_eq!(g.sample_at(&logits, 3).unwrap().id, 2);
        // Logprobs stay those of the unmasked distribution.
        let t = s.sample_at(&logits, 0).unwrap();
        assert_eq!(t.top_logprobs[0].0, 2);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((t.top_logprobs[0].1 - (9.0 - z.ln())).abs() < 1e-5);
    }

    #[test]
    fn a_mask_that_would_remove_every_token_is_not_applied() {
        let mut p = SamplingParams::greedy();
        p.min_tokens = 1;
        p.suppressed_token_ids = vec![0, 1];
        let t = Sampler::new(p, 0)
            .unwrap()
            .sample_at(&[1.0, 2.0], 0)
            .unwrap();
        assert_eq!(t.id, 1);
    }

    #[test]
    fn token_logprobs_of_an_id_beyond_the_vocabulary_is_minus_infinity() {
        let t = token_logprobs(&[0.0, 1.0], 7, Some(1));
        assert_eq!(t.logprob, Some(f32::NEG_INFINITY));
        assert_eq!(t.top_logprobs.len(), 1);
    }
}
