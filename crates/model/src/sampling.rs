//! Token sampling: greedy, temperature, top-k, top-p, seeded; logprobs of the chosen and top tokens.
//!
//! [`sample_with_uniform`] is the pure core: logits, parameters and one uniform number in
//! `[0, 1)` in, a [`SampledToken`] out. [`Sampler`] wraps it with a per-request generator seeded
//! from [`SamplingParams::seed`], drawing exactly one number per sampled token — so a request
//! with a seed produces the same tokens however it is batched or scheduled, and a speculative
//! decoder that consumes draws in the same order reproduces non-speculative output.
//!
//! Order of operations (as vLLM and transformers): temperature, then top-k, then top-p over the
//! renormalized remainder; `temperature == 0` (or `top_k == 1`) is greedy (ties → lowest id).
//! Reported logprobs are those of the model's unmodified distribution (`log_softmax(logits)`),
//! as vLLM reports by default, so they do not depend on the sampling knobs.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;

/// Most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-request sampling knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            logprobs: None,
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

/// A request's sampler: parameters plus its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler for `params`; `fallback_seed` seeds it when `params.seed` is `None`.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: SplitMix64::new(params.seed.unwrap_or(fallback_seed)),
            params,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one token from `logits` (draws one number even when greedy, so the stream
    /// position depends only on the number of tokens sampled).
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken> {
        let u = self.rng.uniform();
        sample_with_uniform(logits, &self.params, u)
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
    indices.map(|i| logits[i] - lse).collect()
}

/// Samples from `logits` with `params`, using `uniform` ∈ `[0, 1)` as the only randomness.
pub fn sample_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    uniform: f64,
) -> Result<SampledToken> {
    if logits.is_empty() {
        return Err(ModelError::Input("sampling from empty logits".into()));
    }
    if logits.iter().any(|x| x.is_nan()) {
        return Err(ModelError::Input("logits contain NaN".into()));
    }
    let id = if params.is_greedy() {
        argmax(logits)
    } else {
        sample_filtered(logits, params, uniform)
    };
    let (logprob, top_logprobs) = match params.logprobs {
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
    Ok(SampledToken {
        id: id as u32,
        logprob,
        top_logprobs,
    })
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
    cand.last().map_or(0, |c| c.0)
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
            logprobs: None,
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
}
