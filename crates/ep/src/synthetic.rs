//! Seeded synthetic expert popularity and routing, for tests, examples and load studies.
//!
//! Pure: the same arguments give the same output on every platform (a SplitMix64 generator, no
//! global randomness). Real routing comes from the model; this stands in for it where only the
//! statistics of routing matter.

use crate::EpError;

/// SplitMix64: a tiny, well-mixed, seedable generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by rejection so there is no modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Zipf popularity over `num_experts` experts: the expert of popularity rank `r` (1-based) gets
/// weight `r^-exponent`, normalized to sum to 1; which expert holds which rank is a seeded random
/// permutation (so hot experts are scattered over ids, as in a trained model).
pub fn zipf_weights(num_experts: usize, exponent: f64, seed: u64) -> Result<Vec<f64>, EpError> {
    if num_experts == 0 {
        return Err(EpError::field("num_experts", "must be at least 1"));
    }
    if !(exponent.is_finite() && exponent >= 0.0) {
        return Err(EpError::field(
            "exponent",
            format!("{exponent} is not a finite non-negative exponent"),
        ));
    }
    let mut rng = SplitMix64(seed);
    let mut rank_of: Vec<usize> = (0..num_experts).collect();
    // Fisher–Yates.
    for i in (1..num_experts).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        rank_of.swap(i, j);
    }
    let raw: Vec<f64> = rank_of
        .iter()
        .map(|&r| ((r + 1) as f64).powf(-exponent))
        .collect();
    let sum: f64 = raw.iter().sum();
    Ok(raw.into_iter().map(|w| w / sum).collect())
}

/// Routing of `num_tokens` tokens, each choosing `k` distinct experts by weighted sampling
/// without replacement from `weights`: logical ids `[num_tokens × k]`, row-major.
pub fn sample_routing(
    weights: &[f64],
    num_tokens: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<u32>, EpError> {
    if k == 0 || k > weights.len() {
        return Err(EpError::field(
            "k",
            format!("{k} experts per token out of {}", weights.len()),
        ));
    }
    if let Some(e) = weights.iter().position(|w| !(w.is_finite() && *w > 0.0)) {
        return Err(EpError::field(
            format!("weights[{e}]"),
            format!("{} is not a finite positive weight", weights[e]),
        ));
    }
    let total: f64 = weights.iter().sum();
    let mut rng = SplitMix64(seed);
    let mut ids = Vec::with_capacity(num_tokens * k);
    let mut taken = vec![false; weights.len()];
    for _ in 0..num_tokens {
        let row_start = ids.len();
        let mut remaining = total;
        for _ in 0..k {
            let mut target = rng.next_f64() * remaining;
            let mut chosen = None;
            for (e, &w) in weights.iter().enumerate() {
                if taken[e] {
                    continue;
                }
                chosen = Some(e);
                if target < w {
                    break;
                }
                target -= w;
            }
            // `chosen` is the last untaken expert if rounding ran past the end.
            if let Some(e) = chosen {
                taken[e] = true;
                remaining -= weights[e];
                ids.push(e as u32);
            }
        }
        for &e in &ids[row_start..] {
            taken[e as usize] = false;
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_weights_are_a_seeded_permutation_of_the_zipf_law() {
        let w = zipf_weights(8, 1.0, 7).unwrap();
        assert_eq!(
            w,
            zipf_weights(8, 1.0, 7).unwrap(),
            "same seed, same weights"
        );
        assert_ne!(w, zipf_weights(8, 1.0, 8).unwrap(), "another seed permutes");
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Rank 1 weighs twice rank 2 at exponent 1.
        assert!((sorted[0] / sorted[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn sampled_routing_picks_k_distinct_experts_per_token() {
        let w = zipf_weights(16, 1.2, 1).unwrap();
        let ids = sample_routing(&w, 200, 4, 3).unwrap();
        assert_eq!(ids.len(), 800);
        for row in ids.chunks(4) {
            let mut r = row.to_vec();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 4, "{row:?}");
        }
        assert_eq!(ids, sample_routing(&w, 200, 4, 3).unwrap());
    }

    #[test]
    fn sampled_routing_follows_the_weights() {
        // Two experts of weight 0.9 / 0.1, one pick per token: about 90% go to the first.
        let ids = sample_routing(&[0.9, 0.1], 10_000, 1, 5).unwrap();
        let first = ids.iter().filter(|&&e| e == 0).count() as f64 / 10_000.0;
        assert!((first - 0.9).abs() < 0.02, "{first}");
    }

    #[test]
    fn more_picks_than_experts_is_an_error_naming_k() {
        let err = sample_routing(&[1.0, 1.0], 1, 3, 0).unwrap_err();
        assert!(err.to_string().contains("`k`"), "{err}");
    }
}
