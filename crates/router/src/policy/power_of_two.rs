//! Power of two choices: sample two distinct healthy instances with the seeded random source; the
//! one with the lower load score ([`super::load_score`]) wins. Cheaper to keep fresh than a global
//! minimum and avoids herding onto one instance when stats are stale.

use rand::{Rng, RngCore};

use super::least_load::LeastLoadConfig;
use super::{InstanceView, Policy, RequestFeatures, healthy_indices, load_score};

/// Power-of-two-choices policy.
#[derive(Debug, Clone)]
pub struct PowerOfTwo {
    config: LeastLoadConfig,
}

impl PowerOfTwo {
    /// A power-of-two policy scoring with `config`'s load score.
    pub fn new(config: LeastLoadConfig) -> Self {
        PowerOfTwo { config }
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn select(
        &self,
        instances: &[InstanceView],
        _request: &RequestFeatures<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<usize> {
        let healthy = healthy_indices(instances);
        match healthy.len() {
            0 => None,
            1 => healthy.first().copied(),
            n => {
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (healthy[a], healthy[b]);
                let w = self.config.kv_weight_tokens;
                let (sa, sb) = (load_score(&instances[ia], w), load_score(&instances[ib], w));
                Some(if sb < sa { ib } else { ia })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn req() -> RequestFeatures<'static> {
        RequestFeatures {
            seq: 0,
            prompt_token_ids: &[],
        }
    }

    #[test]
    fn the_most_loaded_instance_is_never_chosen() {
        // With two candidates drawn without replacement, the strict maximum always loses.
        let mut views: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        for (i, v) in views.iter_mut().enumerate() {
            v.queued_prompt_tokens = 100 * i as u64;
        }
        let p = PowerOfTwo::new(LeastLoadConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        for _ in 0..400 {
            counts[p.select(&views, &req(), &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        // The least loaded wins whenever drawn: 3 of the 6 pairs contain it → about half.
        assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }

    #[test]
    fn equal_loads_spread_over_all_instances() {
        let views: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        let p = PowerOfTwo::new(LeastLoadConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            counts[p.select(&views, &req(), &mut rng).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let views: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        let p = PowerOfTwo::new(LeastLoadConfig::default());
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| p.select(&views, &req(), &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
    }

    #[test]
    fn a_single_healthy_instance_is_chosen() {
        let mut views: Vec<_> = ["a", "b"].iter().map(|id| InstanceView::idle(id)).collect();
        views[0].healthy = false;
        let p = PowerOfTwo::new(LeastLoadConfig::default());
        assert_eq!(
            p.select(&views, &req(), &mut StdRng::seed_from_u64(0)),
            Some(1)
        );
    }
}
