//! Data-parallel attention ranks: which GPU of the EP group runs each request's attention.
//!
//! Every GPU of a decode instance is a DP attention rank holding its own requests and their latent
//! KV (DESIGN §4). A request gets its rank when the executor first sees it (admission) and keeps it
//! until it finishes, so its KV never moves; preemption does not change it. The choice is the
//! least-loaded rank by number of requests held, ties to the lowest index, so a batch of `n × D`
//! requests lands exactly `n` per rank.
//!
//! Invariant: `load[r]` equals the number of requests assigned to rank `r`.

use std::collections::HashMap;

use crate::sequence::RequestId;

/// Request → DP rank assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpRanks {
    load: Vec<u32>,
    of: HashMap<RequestId, u32>,
}

impl DpRanks {
    /// `ranks` ranks (at least 1).
    pub fn new(ranks: u32) -> Self {
        Self {
            load: vec![0; ranks.max(1) as usize],
            of: HashMap::new(),
        }
    }

    /// Number of ranks.
    pub fn num_ranks(&self) -> u32 {
        self.load.len() as u32
    }

    /// The rank of `id`, assigning the least-loaded one on first sight.
    pub fn assign(&mut self, id: RequestId) -> u32 {
        if let Some(&r) = self.of.get(&id) {
            return r;
        }
        let mut best = 0usize;
        for (r, &l) in self.load.iter().enumerate() {
            if l < self.load[best] {
                best = r;
            }
        }
        self.load[best] += 1;
        self.of.insert(id, best as u32);
        best as u32
    }

    /// The rank of `id`, if assigned.
    pub fn get(&self, id: RequestId) -> Option<u32> {
        self.of.get(&id).copied()
    }

    /// Forgets `id` (finished or cancelled).
    pub fn release(&mut self, id: RequestId) {
        if let Some(r) = self.of.remove(&id)
            && let Some(l) = self.load.get_mut(r as usize)
        {
            *l = l.saturating_sub(1);
        }
    }

    /// Requests held by each rank.
    pub fn loads(&self) -> &[u32] {
        &self.load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_spread_evenly_and_keep_their_rank() {
        let mut d = DpRanks::new(4);
        let ranks: Vec<u32> = (0..8).map(|i| d.assign(RequestId(i))).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(d.assign(RequestId(5)), 1);
        assert_eq!(d.loads(), &[2, 2, 2, 2]);
    }

    #[test]
    fn a_released_slot_is_refilled_first() {
        let mut d = DpRanks::new(3);
        for i in 0..6 {
            d.assign(RequestId(i));
        }
        d.release(RequestId(4)); // rank 1
        d.release(RequestId(99)); // unknown: no effect
        assert_eq!(d.loads(), &[2, 1, 2]);
        assert_eq!(d.assign(RequestId(10)), 1);
        assert_eq!(d.get(RequestId(4)), None);
    }
}
