//! Arrival schedules: when each request is due.
//!
//! [`build_schedule`] is a pure function of `(seed, ArrivalSpec, ScheduleBounds)`: no clock reads,
//! no global randomness. The runner only sleeps until the times it returns, so the same seed gives
//! the same intended send times on every machine (the generator is ChaCha8, whose stream is fixed
//! by its specification).
//!
//! Invariants of a [`Schedule`]:
//! - `intended_s` is non-decreasing, starts at `0.0` (the first request is due at once) and holds
//!   at most `bounds.count` entries;
//! - with a duration bound every entry is `< duration_s`;
//! - for [`ArrivalSpec::Burst`] every entry is `0.0`; the runner then measures latency from the
//!   actual send time (a closed loop when a concurrency cap is set).
//!
//! Interval semantics follow vLLM's `bench serve`: with rate `r` and burstiness `b` the gap between
//! consecutive requests is Gamma-distributed with shape `b` and scale `1/(r·b)`, so its mean is
//! `1/r` and its coefficient of variation is `1/√b` (`b = 1`: Poisson; `b < 1`: burstier; `b = ∞`:
//! constant gaps). Unlike vLLM, the gaps are not rescaled afterwards to hit `count/r` exactly, so
//! the arrivals are a true renewal process.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// How the ramp-up rate moves from its start to its end value over the requests of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampStrategy {
    /// `rate_i = start + (end − start) · i/(n − 1)`.
    Linear,
    /// `rate_i = start · (end/start)^(i/(n − 1))`.
    Exponential,
}

/// When requests arrive, independent of how many run at once (the concurrency cap is applied by
/// the runner).
#[derive(Debug, Clone, PartialEq)]
pub enum ArrivalSpec {
    /// Every request is due at once (`--request-rate inf`). With a concurrency cap this is a
    /// closed loop of fixed concurrency.
    Burst,
    /// Renewal process with Gamma gaps: mean `1/rate_per_s`, shape `burstiness`.
    Gamma {
        /// Mean arrival rate, requests per second (> 0, finite).
        rate_per_s: f64,
        /// Gamma shape (> 0; `f64::INFINITY` gives constant gaps).
        burstiness: f64,
    },
    /// Gamma gaps whose rate moves from `start_per_s` to `end_per_s` by request index.
    Ramp {
        /// Linear or exponential interpolation.
        strategy: RampStrategy,
        /// Rate of the first requests (≥ 0 for linear, > 0 for exponential).
        start_per_s: f64,
        /// Rate of the last request (> 0).
        end_per_s: f64,
        /// Gamma shape of the gaps.
        burstiness: f64,
    },
    /// Replay of recorded offsets (seconds, any origin) stretched by `slowdown`.
    Trace {
        /// Arrival offsets in request order.
        offsets_s: Vec<f64>,
        /// `2.0` replays at half speed; must be > 0.
        slowdown: f64,
    },
}

/// Limits on a schedule: at most `count` requests, none due at or after `duration_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleBounds {
    /// Maximum number of requests.
    pub count: usize,
    /// Optional wall-clock window, seconds from the start of the run.
    pub duration_s: Option<f64>,
}

/// Intended send times, seconds from the start of the run, in send order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// One entry per request; see the module invariants.
    pub intended_s: Vec<f64>,
    /// Whether latency is measured from `intended_s` (open loop) or from the actual send time
    /// (burst / closed loop, where no send time is intended).
    pub open_loop: bool,
}

/// A value of the arrival specification that cannot describe a schedule.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    /// A rate, shape or factor is out of its domain.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidParameter {
        /// Name of the parameter (as the command-line flag spells it).
        field: &'static str,
        /// The rejected value.
        value: f64,
        /// What the domain is.
        reason: &'static str,
    },
}

fn check(
    field: &'static str,
    value: f64,
    ok: bool,
    reason: &'static str,
) -> Result<(), ScheduleError> {
    if ok {
        Ok(())
    } else {
        Err(ScheduleError::InvalidParameter {
            field,
            value,
            reason,
        })
    }
}

fn check_burstiness(b: f64) -> Result<(), ScheduleError> {
    check("--burstiness", b, b > 0.0, "must be > 0 (inf allowed)")
}

/// Samples one gap with mean `1/rate_per_s` and Gamma shape `burstiness`.
fn gamma_gap_s(rng: &mut ChaCha8Rng, rate_per_s: f64, burstiness: f64) -> f64 {
    if burstiness.is_infinite() {
        return 1.0 / rate_per_s;
    }
    let scale = 1.0 / (rate_per_s * burstiness);
    match Gamma::new(burstiness, scale) {
        Ok(dist) => dist.sample(rng),
        // Unreachable for validated inputs; a constant gap keeps the mean right regardless.
        Err(_) => 1.0 / rate_per_s,
    }
}

fn ramp_rate_per_s(strategy: RampStrategy, start: f64, end: f64, i: usize, n: usize) -> f64 {
    let progress = i as f64 / (n.saturating_sub(1).max(1)) as f64;
    match strategy {
        RampStrategy::Linear => start + (end - start) * progress,
        RampStrategy::Exponential => start * (end / start).powf(progress),
    }
}

/// Builds the intended send times of a run. Pure: same inputs, same output.
///
/// ```
/// use loadtest::schedule::{build_schedule, ArrivalSpec, ScheduleBounds};
/// let spec = ArrivalSpec::Gamma { rate_per_s: 10.0, burstiness: 1.0 };
/// let bounds = ScheduleBounds { count: 100, duration_s: None };
/// let a = build_schedule(7, &spec, &bounds).unwrap();
/// let b = build_schedule(7, &spec, &bounds).unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a.intended_s.len(), 100);
/// ```
pub fn build_schedule(
    seed: u64,
    spec: &ArrivalSpec,
    bounds: &ScheduleBounds,
) -> Result<Schedule, ScheduleError> {
    if let Some(d) = bounds.duration_s {
        check("--duration", d, d > 0.0, "must be > 0 seconds")?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = bounds.count;
    let mut times = Vec::with_capacity(n.min(1 << 20));
    let open_loop = !matches!(spec, ArrivalSpec::Burst);
    match spec {
        ArrivalSpec::Burst => times.resize(n, 0.0),
        ArrivalSpec::Gamma {
            rate_per_s,
            burstiness,
        } => {
            let (rate, b) = (*rate_per_s, *burstiness);
            check(
                "--request-rate",
                rate,
                rate > 0.0 && rate.is_finite(),
                "must be finite and > 0",
            )?;
            check_burstiness(b)?;
            let mut t = 0.0;
            for i in 0..n {
                if b.is_infinite() {
                    // Constant gaps: multiply rather than accumulate, so no rounding drift.
                    t = i as f64 / rate;
                } else if i > 0 {
                    t += gamma_gap_s(&mut rng, rate, b);
                }
                times.push(t);
            }
        }
        ArrivalSpec::Ramp {
            strategy,
            start_per_s,
            end_per_s,
            burstiness,
        } => {
            let (start, end, b) = (*start_per_s, *end_per_s, *burstiness);
            let start_ok = match strategy {
                RampStrategy::Linear => start >= 0.0 && start.is_finite(),
                RampStrategy::Exponential => start > 0.0 && start.is_finite(),
            };
            check(
                "--ramp-up-start-rps",
                start,
                start_ok,
                "must be finite, ≥ 0 (> 0 if exponential)",
            )?;
            check(
                "--ramp-up-end-rps",
                end,
                end > 0.0 && end.is_finite(),
                "must be finite and > 0",
            )?;
            check_burstiness(b)?;
            let mut t = 0.0;
            for i in 0..n {
                if i > 0 {
                    let rate = ramp_rate_per_s(*strategy, start, end, i, n);
                    t += gamma_gap_s(&mut rng, rate, b);
                }
                times.push(t);
            }
        }
        ArrivalSpec::Trace {
            offsets_s,
            slowdown,
        } => {
            let s = *slowdown;
            check(
                "--trace-slowdown",
                s,
                s > 0.0 && s.is_finite(),
                "must be finite and > 0",
            )?;
            let origin = offsets_s.iter().copied().fold(f64::INFINITY, f64::min);
            let mut latest = 0.0_f64;
            for &offset in offsets_s.iter().take(n) {
                // Out-of-order trace lines are sent no earlier than their predecessors.
                latest = latest.max((offset - origin) * s);
                times.push(latest);
            }
        }
    }
    if let Some(d) = bounds.duration_s {
        let keep = times.partition_point(|&t| t < d);
        times.truncate(keep);
    }
    Ok(Schedule {
        intended_s: times,
        open_loop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(count: usize) -> ScheduleBounds {
        ScheduleBounds {
            count,
            duration_s: None,
        }
    }

    fn gaps(s: &Schedule) -> Vec<f64> {
        s.intended_s.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn mean_and_cv(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn same_seed_gives_same_schedule_and_other_seed_differs() {
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 5.0,
            burstiness: 0.5,
        };
        let a = build_schedule(42, &spec, &bounds(500)).unwrap();
        let b = build_schedule(42, &spec, &bounds(500)).unwrap();
        let c = build_schedule(43, &spec, &bounds(500)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn poisson_mean_rate_is_within_statistical_bounds() {
        // 20,000 exponential gaps: the sample mean has relative standard error 1/√20000 ≈ 0.7%;
        // ±3% is more than 4 standard errors.
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 8.0,
            burstiness: 1.0,
        };
        let s = build_schedule(1, &spec, &bounds(20_001)).unwrap();
        let (mean, cv) = mean_and_cv(&gaps(&s));
        assert!((mean * 8.0 - 1.0).abs() < 0.03, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.05, "Poisson gaps have CV 1, got {cv}");
    }

    #[test]
    fn burstiness_is_gamma_shape_keeping_mean_interval() {
        for (b, expected_cv) in [(0.25, 2.0), (4.0, 0.5)] {
            let spec = ArrivalSpec::Gamma {
                rate_per_s: 2.0,
                burstiness: b,
            };
            let s = build_schedule(9, &spec, &bounds(40_001)).unwrap();
            let (mean, cv) = mean_and_cv(&gaps(&s));
            assert!(
                (mean * 2.0 - 1.0).abs() < 0.05,
                "burstiness {b}: mean gap {mean}"
            );
            assert!(
                (cv / expected_cv - 1.0).abs() < 0.08,
                "burstiness {b}: CV {cv}"
            );
        }
    }

    #[test]
    fn infinite_burstiness_gives_constant_gaps() {
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 4.0,
            burstiness: f64::INFINITY,
        };
        let s = build_schedule(0, &spec, &bounds(5)).unwrap();
        assert_eq!(s.intended_s, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn burst_is_all_due_at_once_and_not_open_loop() {
        let s = build_schedule(0, &ArrivalSpec::Burst, &bounds(3)).unwrap();
        assert_eq!(s.intended_s, vec![0.0; 3]);
        assert!(!s.open_loop);
    }

    #[test]
    fn duration_bound_truncates_schedule() {
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 10.0,
            burstiness: f64::INFINITY,
        };
        let b = ScheduleBounds {
            count: 1000,
            duration_s: Some(1.05),
        };
        let s = build_schedule(0, &spec, &b).unwrap();
        assert_eq!(s.intended_s.len(), 11); // 0.0, 0.1, …, 1.0
        assert!(s.intended_s.iter().all(|&t| t < 1.05));
    }

    #[test]
    fn linear_ramp_gaps_shrink_as_rate_grows() {
        let spec = ArrivalSpec::Ramp {
            strategy: RampStrategy::Linear,
            start_per_s: 1.0,
            end_per_s: 11.0,
            burstiness: f64::INFINITY,
        };
        let s = build_schedule(0, &spec, &bounds(11)).unwrap();
        let g = gaps(&s);
        // Request i (i ≥ 1) follows a gap of 1/rate_i with rate_i = 1 + i.
        for (k, gap) in g.iter().enumerate() {
            let i = k + 1;
            assert!((gap - 1.0 / (1.0 + i as f64)).abs() < 1e-12);
        }
    }

    #[test]
    fn exponential_ramp_reaches_end_rate() {
        let spec = ArrivalSpec::Ramp {
            strategy: RampStrategy::Exponential,
            start_per_s: 1.0,
            end_per_s: 16.0,
            burstiness: f64::INFINITY,
        };
        let s = build_schedule(0, &spec, &bounds(5)).unwrap();
        let g = gaps(&s);
        // rates 2, 4, 8, 16 for requests 1..4.
        let expected = [0.5, 0.25, 0.125, 0.0625];
        for (gap, e) in g.iter().zip(expected) {
            assert!((gap - e).abs() < 1e-12);
        }
    }

    #[test]
    fn trace_offsets_are_rebased_and_stretched() {
        let spec = ArrivalSpec::Trace {
            offsets_s: vec![10.0, 10.5, 12.0],
            slowdown: 2.0,
        };
        let s = build_schedule(0, &spec, &bounds(10)).unwrap();
        assert_eq!(s.intended_s, vec![0.0, 1.0, 4.0]);
    }

    #[test]
    fn invalid_rate_is_rejected_naming_the_flag() {
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 0.0,
            burstiness: 1.0,
        };
        let err = build_schedule(0, &spec, &bounds(1)).unwrap_err();
        assert!(err.to_string().contains("--request-rate"));
        let spec = ArrivalSpec::Gamma {
            rate_per_s: 1.0,
            burstiness: -1.0,
        };
        let err = build_schedule(0, &spec, &bounds(1)).unwrap_err();
        assert!(err.to_string().contains("--burstiness"));
    }
}
