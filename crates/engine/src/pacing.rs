//! Pacing: releasing a step's results no earlier than its simulated duration allows.
//!
//! A service shows clients simulated time: the results of a step that started at `start_ns` (on the
//! driver's monotonic clock) are released at `start_ns + sim_duration_ns * time_scale`. When the host
//! finished computing later than that release time, the step is *late*: the lag
//! `real_end_ns - release_ns` is counted (never hidden) and the results go out at `real_end_ns`.
//! `time_scale == 0` disables pacing: results go out as soon as they are computed and no lag is
//! counted.
//!
//! [`Pacer`] is pure: times are arguments, it never reads a clock or sleeps; the async driver sleeps
//! for [`Pace::wait_ns`].

/// Invalid pacer settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PacerError {
    /// `time_scale` is negative, NaN or infinite.
    #[error("pacing: `time_scale` must be a finite number >= 0, got {0}")]
    TimeScale(f64),
}

/// When to release one step's results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Release time: `max(start + scaled duration, real_end)` (or `real_end` when pacing is off).
    pub release_ns: u64,
    /// How long to wait after `real_end_ns` before releasing.
    pub wait_ns: u64,
    /// How late the host was (`real_end - (start + scaled duration)`, or 0).
    pub lag_ns: u64,
}

/// Pacing state: the scale and the accumulated lag.
#[derive(Clone, Debug, PartialEq)]
pub struct Pacer {
    time_scale: f64,
    steps_total: u64,
    late_steps_total: u64,
    lag_ns_total: u64,
    sim_ns_total: u64,
}

impl Pacer {
    /// A pacer at `time_scale` (1.0 = real time equals simulated time; 0 = no pacing).
    pub fn new(time_scale: f64) -> Result<Self, PacerError> {
        if !time_scale.is_finite() || time_scale < 0.0 {
            return Err(PacerError::TimeScale(time_scale));
        }
        Ok(Self {
            time_scale,
            steps_total: 0,
            late_steps_total: 0,
            lag_ns_total: 0,
            sim_ns_total: 0,
        })
    }

    /// The scale.
    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// Whether pacing is on (`time_scale > 0`).
    pub fn is_enabled(&self) -> bool {
        self.time_scale > 0.0
    }

    /// `sim_duration_ns * time_scale`, rounded to the nearest ns (saturating).
    pub fn scaled_ns(&self, sim_duration_ns: u64) -> u64 {
        let scaled = (sim_duration_ns as f64 * self.time_scale).round();
        if scaled >= u64::MAX as f64 {
            u64::MAX
        } else {
            scaled as u64
        }
    }

    /// Earliest release time of a step, `None` when pacing is off. Pure.
    pub fn release_ns(&self, step_start_ns: u64, sim_duration_ns: u64) -> Option<u64> {
        self.is_enabled()
            .then(|| step_start_ns.saturating_add(self.scaled_ns(sim_duration_ns)))
    }

    /// Decides a step's release given when its real compute ended, and records its lag.
    pub fn pace(&mut self, step_start_ns: u64, sim_duration_ns: u64, real_end_ns: u64) -> Pace {
        self.steps_total += 1;
        self.sim_ns_total = self.sim_ns_total.saturating_add(sim_duration_ns);
        let Some(target_ns) = self.release_ns(step_start_ns, sim_duration_ns) else {
            return Pace {
                release_ns: real_end_ns,
                wait_ns: 0,
                lag_ns: 0,
            };
        };
        let lag_ns = real_end_ns.saturating_sub(target_ns);
        if lag_ns > 0 {
            self.late_steps_total += 1;
            self.lag_ns_total = self.lag_ns_total.saturating_add(lag_ns);
        }
        Pace {
            release_ns: target_ns.max(real_end_ns),
            wait_ns: target_ns.saturating_sub(real_end_ns),
            lag_ns,
        }
    }

    /// Steps paced.
    pub fn steps_total(&self) -> u64 {
        self.steps_total
    }

    /// Steps whose compute ended after their release time.
    pub fn late_steps_total(&self) -> u64 {
        self.late_steps_total
    }

    /// Sum of all steps' lag.
    pub fn lag_ns_total(&self) -> u64 {
        self.lag_ns_total
    }

    /// Sum of all steps' simulated durations (unscaled).
    pub fn sim_ns_total(&self) -> u64 {
        self.sim_ns_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_compute_waits_until_the_scaled_duration() {
        let mut p = Pacer::new(2.0).unwrap();
        // Start 1_000, 14.76 ms simulated x 2 = 29.52 ms: release at 29_521_000. Compute took 5 ms.
        let pace = p.pace(1_000, 14_760_000, 5_001_000);
        assert_eq!(
            pace,
            Pace {
                release_ns: 29_521_000,
                wait_ns: 24_520_000,
                lag_ns: 0
            }
        );
        assert_eq!(p.late_steps_total(), 0);
    }

    #[test]
    fn late_compute_is_released_at_once_and_lag_is_counted() {
        let mut p = Pacer::new(0.5).unwrap();
        // 10 ms simulated x 0.5 = 5 ms; compute ended at 8 ms: 3 ms late.
        let pace = p.pace(0, 10_000_000, 8_000_000);
        assert_eq!(
            pace,
            Pace {
                release_ns: 8_000_000,
                wait_ns: 0,
                lag_ns: 3_000_000
            }
        );
        p.pace(8_000_000, 10_000_000, 14_000_000);
        assert_eq!(p.lag_ns_total(), 4_000_000);
        assert_eq!((p.steps_total(), p.late_steps_total()), (2, 2));
        assert_eq!(p.sim_ns_total(), 20_000_000);
    }

    #[test]
    fn zero_time_scale_disables_pacing() {
        let mut p = Pacer::new(0.0).unwrap();
        assert_eq!(p.release_ns(0, 1_000), None);
        let pace = p.pace(0, 1_000_000_000, 7);
        assert_eq!(
            pace,
            Pace {
                release_ns: 7,
                wait_ns: 0,
                lag_ns: 0
            }
        );
        assert_eq!(p.lag_ns_total(), 0);
    }

    #[test]
    fn invalid_time_scales_are_rejected() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(Pacer::new(bad).is_err());
        }
        assert_eq!(Pacer::new(1e300).unwrap().scaled_ns(u64::MAX), u64::MAX);
    }
}
