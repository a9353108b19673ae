//! Speculative decoding: verifying a draft token against the target model's distribution.
//!
//! The MTP module proposes a draft `d` for the token after the last one; the next step computes the
//! target distribution `p` at that position and decides whether `d` stands. The standard rule
//! (Leviathan et al. 2023; Chen et al. 2023) keeps the output distributed exactly as `p`:
//! accept `d` with probability `min(1, p(d) / q(d))`, where `q` is the distribution `d` was drawn
//! from; on rejection emit a token drawn from `norm(max(0, p − q))`.
//!
//! Two ways to run it, both exact:
//! - [`verify_with_draft_distribution`]: the rule as stated, for a draft sampled from a
//!   distribution `q` (the executor's [`DraftMode::Sample`](crate::DraftMode::Sample)); it uses two
//!   uniforms (accept, resample).
//! - [`verify_point_mass`]: a greedy draft (`q` = point mass at `d`, the default
//!   [`DraftMode::Greedy`](crate::DraftMode::Greedy)). The rule then reads: accept with probability
//!   `p(d)`, else draw from `p` with `d` removed and renormalized. Drawing `t ~ p` with the
//!   request's own sampler and accepting iff `t == d` has exactly that law (`P(accept) = p(d)`;
//!   given rejection, `t` is `p` conditioned on `t ≠ d`), and it consumes the sampler's stream
//!   exactly as decoding without a draft would: so a seeded request produces the *same tokens* with
//!   MTP on and off, not only the same distribution.
//!
//! [`target_probs`] is the distribution the model's sampler draws from (temperature, then top-k,
//! then top-p, as `pdserve_model::sampling` applies them); greedy parameters give a point mass at
//! the argmax (lowest id on ties).

use pdserve_model::{Result as ModelResult, SampledToken, Sampler, SamplingParams};

/// Outcome of verifying one draft.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The draft stands: emit it (and then the model's token after it).
    Accepted,
    /// The draft is replaced by `token`.
    Rejected {
        /// The token emitted instead.
        token: u32,
    },
}

impl Verdict {
    /// Whether the draft was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Verdict::Accepted)
    }

    /// The token emitted at the draft's position.
    pub fn token(&self, draft: u32) -> u32 {
        match *self {
            Verdict::Accepted => draft,
            Verdict::Rejected { token } => token,
        }
    }
}

/// Index of the largest value, lowest index on ties (0 for an empty slice).
pub(crate) fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in values.iter().enumerate() {
        if x > values[best] {
            best = i;
        }
    }
    best
}

/// The probability of every token under `params` (sums to 1). Empty logits give an empty vector.
pub fn target_probs(logits: &[f32], params: &SamplingParams) -> Vec<f64> {
    let n = logits.len();
    let mut probs = vec![0.0f64; n];
    if n == 0 {
        return probs;
    }
    if params.is_greedy() {
        probs[argmax(logits)] = 1.0;
        return probs;
    }
    let inv_t = 1.0 / f64::from(params.temperature);
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((f64::from(l) - max) * inv_t).exp()))
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
            if acc >= f64::from(params.top_p) * total {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    for (i, w) in cand {
        probs[i] = w / total;
    }
    probs
}

/// Draws an index from the (possibly unnormalized) non-negative `weights` by inverse CDF with
/// `uniform` in `[0, 1)`; `None` when every weight is zero.
pub fn sample_index(weights: &[f64], uniform: f64) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let target = uniform * total;
    let mut acc = 0.0;
    let mut last = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += w;
            last = Some(i);
            if target < acc {
                return Some(i);
            }
        }
    }
    last
}

/// The standard rule for a draft `draft` drawn from `q`: accept with probability
/// `min(1, p(d)/q(d))` (decided by `u_accept`), else draw from `norm(max(0, p − q))` with
/// `u_resample`. `p` and `q` are distributions over the same vocabulary.
pub fn verify_with_draft_distribution(
    p: &[f64],
    q: &[f64],
    draft: u32,
    u_accept: f64,
    u_resample: f64,
) -> Verdict {
    let d = draft as usize;
    let pd = p.get(d).copied().unwrap_or(0.0);
    let qd = q.get(d).copied().unwrap_or(0.0);
    if qd > 0.0 && u_accept < (pd / qd).min(1.0) {
        return Verdict::Accepted;
    }
    let residual: Vec<f64> = p
        .iter()
        .enumerate()
        .map(|(i, &pi)| (pi - q.get(i).copied().unwrap_or(0.0)).max(0.0))
        .collect();
    // p == q (up to rounding) cannot reject in exact arithmetic; fall back to p itself.
    let token = sample_index(&residual, u_resample)
        .or_else(|| sample_index(p, u_resample))
        .unwrap_or(d);
    Verdict::Rejected {
        token: token as u32,
    }
}

/// Verifies a greedy draft at output index `index` with the request's sampler (see the module
/// docs): samples the target token `t` from `logits` with draw `index`, as decoding without a
/// draft would, and accepts iff `t == draft`. Returns the verdict and the sampled token (its
/// logprobs when the parameters ask for them).
pub fn verify_point_mass(
    logits: &[f32],
    draft: u32,
    sampler: &Sampler,
    index: usize,
) -> ModelResult<(Verdict, SampledToken)> {
    let t = sampler.sample_at(logits, index)?;
    let verdict = if t.id == draft {
        Verdict::Accepted
    } else {
        Verdict::Rejected { token: t.id }
    };
    Ok((verdict, t))
}

/// `log_softmax(logits)[token]`, computed stably (NaN-free for finite logits).
pub fn logprob_of(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max)
        + logits
            .iter()
            .map(|&x| f64::from(x - max).exp())
            .sum::<f64>()
            .ln();
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - lse) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_model::rng::SplitMix64;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Pearson's chi-square statistic of `counts` against probabilities `p` (cells with p = 0 must
    /// be empty; returns infinity otherwise).
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        let mut chi = 0.0;
        for (&c, &pi) in counts.iter().zip(p) {
            let expected = pi * n as f64;
            if expected == 0.0 {
                if c > 0 {
                    return f64::INFINITY;
                }
                continue;
            }
            chi += (c as f64 - expected).powi(2) / expected;
        }
        chi
    }

    // A small vocabulary with a target far from the draft distribution.
    const LOGITS_P: [f32; 6] = [1.2, 0.3, -0.5, 2.0, 0.0, -1.5];
    const LOGITS_Q: [f32; 6] = [0.1, 1.8, -0.2, 0.4, 1.1, -0.3];
    // chi-square with 5 degrees of freedom: P(X > 25) ~ 1.4e-4; seeds are fixed, so the test is
    // deterministic and this bound only says the fixed draws are not an outlier.
    const CHI2_BOUND_5DF: f64 = 25.0;
    const DRAWS: u64 = 60_000;

    #[test]
    fn target_probs_match_the_models_sampler() {
        let cases = [
            params(1.0, 0, 1.0, 0),
            params(0.7, 3, 1.0, 0),
            params(1.3, 0, 0.8, 0),
            params(0.9, 4, 0.7, 0),
        ];
        for p in cases {
            let probs = target_probs(&LOGITS_P, &p);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let mut counts = [0u64; 6];
            let mut s = Sampler::new(p.clone(), 0).unwrap();
            for _ in 0..DRAWS {
                counts[s.sample(&LOGITS_P).unwrap().id as usize] += 1;
            }
            let chi = chi_square(&counts, &probs);
            assert!(chi < CHI2_BOUND_5DF, "{p:?}: chi2 {chi}, counts {counts:?}");
        }
        let greedy = target_probs(&[0.0, 3.0, 3.0], &SamplingParams::greedy());
        assert_eq!(greedy, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn standard_rule_keeps_the_target_distribution_over_many_seeds() {
        let sp = params(1.0, 0, 1.0, 0);
        let p = target_probs(&LOGITS_P, &sp);
        let q = target_probs(&LOGITS_Q, &sp);
        let mut counts = [0u64; 6];
        let mut accepted = 0u64;
        for seed in 0..DRAWS {
            let mut rng = SplitMix64::new(seed);
            let draft = sample_index(&q, rng.uniform()).unwrap() as u32;
            let v = verify_with_draft_distribution(&p, &q, draft, rng.uniform(), rng.uniform());
            accepted += u64::from(v.is_accepted());
            counts[v.token(draft) as usize] += 1;
        }
        let chi = chi_square(&counts, &p);
        assert!(chi < CHI2_BOUND_5DF, "chi2 {chi}, counts {counts:?}");
        // Acceptance probability of the rule is sum_i min(p_i, q_i).
        let expect: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
        let rate = accepted as f64 / DRAWS as f64;
        assert!(
            (rate - expect).abs() < 0.01,
            "acceptance {rate} vs {expect}"
        );
    }

    #[test]
    fn greedy_draft_verification_keeps_the_distribution_and_accepts_with_p_of_draft() {
        let sp_of = |seed| params(0.8, 0, 0.95, seed);
        let p = target_probs(&LOGITS_P, &sp_of(0));
        for draft in [3u32, 1] {
            let mut counts = [0u64; 6];
            let mut accepted = 0u64;
            for seed in 0..DRAWS {
                let sampler = Sampler::new(sp_of(seed), 0).unwrap();
                let (v, t) = verify_point_mass(&LOGITS_P, draft, &sampler, 0).unwrap();
                assert_eq!(v.token(draft), t.id);
                accepted += u64::from(v.is_accepted());
                counts[v.token(draft) as usize] += 1;
            }
            let chi = chi_square(&counts, &p);
            assert!(
                chi < CHI2_BOUND_5DF,
                "draft {draft}: chi2 {chi}, counts {counts:?}"
            );
            let rate = accepted as f64 / DRAWS as f64;
            assert!(
                (rate - p[draft as usize]).abs() < 0.01,
                "draft {draft}: acceptance {rate} vs p(d) {}",
                p[draft as usize]
            );
        }
    }

    #[test]
    fn point_mass_rule_equals_the_standard_rule_with_a_delta_draft() {
        // With q = delta_d the standard rule accepts with p(d) and otherwise draws from p without d:
        // the same law as verify_point_mass (compared on the rejection branch's distribution).
        let sp = params(1.0, 0, 1.0, 0);
        let p = target_probs(&LOGITS_P, &sp);
        let draft = 3u32;
        let mut q = vec![0.0; 6];
        q[draft as usize] = 1.0;
        let mut counts = [0u64; 6];
        for seed in 0..DRAWS {
            let mut rng = SplitMix64::new(seed);
            let v = verify_with_draft_distribution(&p, &q, draft, rng.uniform(), rng.uniform());
            counts[v.token(draft) as usize] += 1;
        }
        let chi = chi_square(&counts, &p);
        assert!(chi < CHI2_BOUND_5DF, "chi2 {chi}, counts {counts:?}");
    }

    #[test]
    fn greedy_parameters_accept_exactly_the_argmax() {
        let p = target_probs(&LOGITS_P, &SamplingParams::greedy());
        let q = target_probs(&LOGITS_Q, &SamplingParams::greedy());
        // q's argmax (1) is not p's (3): always rejected, replaced by p's argmax.
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(
                verify_with_draft_distribution(&p, &q, 1, u, u),
                Verdict::Rejected { token: 3 }
            );
            assert_eq!(
                verify_with_draft_distribution(&p, &p, 3, u, u),
                Verdict::Accepted
            );
        }
        let s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(
            verify_point_mass(&LOGITS_P, 3, &s, 0).unwrap().0,
            Verdict::Accepted
        );
    }

    #[test]
    fn logprob_is_the_log_softmax() {
        let l = [1.0f32, 3.0, 2.0];
        let z: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((f64::from(logprob_of(&l, 1)) - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(logprob_of(&l, 9), f32::NEG_INFINITY);
        assert_eq!(sample_index(&[0.0, 0.0], 0.5), None);
        assert_eq!(sample_index(&[0.0, 2.0, 2.0], 0.5), Some(2));
    }
}
