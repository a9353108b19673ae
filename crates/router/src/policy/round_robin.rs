//! Round robin over the healthy instances, positioned by the request's sequence number.

use rand::RngCore;

use super::{InstanceView, Policy, RequestFeatures, healthy_indices};

/// Healthy instances in turn: request `seq` goes to the `seq mod h`-th healthy instance.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundRobin;

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn select(
        &self,
        instances: &[InstanceView],
        request: &RequestFeatures<'_>,
        _rng: &mut dyn RngCore,
    ) -> Option<usize> {
        let healthy = healthy_indices(instances);
        if healthy.is_empty() {
            return None;
        }
        let pos = (request.seq % healthy.len() as u64) as usize;
        healthy.get(pos).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn consecutive_requests_visit_every_healthy_instance_in_turn() {
        let mut views: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| InstanceView::idle(id))
            .collect();
        views[1].healthy = false;
        let mut rng = StdRng::seed_from_u64(0);
        let picks: Vec<_> = (0..4)
            .map(|seq| {
                let req = RequestFeatures {
                    seq,
                    prompt_token_ids: &[],
                };
                RoundRobin.select(&views, &req, &mut rng).unwrap()
            })
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    #[test]
    fn no_healthy_instance_means_no_choice() {
        let mut views = vec![InstanceView::idle("a")];
        views[0].healthy = false;
        let req = RequestFeatures {
            seq: 0,
            prompt_token_ids: &[],
        };
        assert_eq!(
            RoundRobin.select(&views, &req, &mut StdRng::seed_from_u64(0)),
            None
        );
    }
}
