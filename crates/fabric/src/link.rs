//! One link direction as a processor-sharing server with a fixed latency.
//!
//! [`LinkSim`] is the fabric's elementary resource: every transfer active on the link gets an equal
//! share of its bandwidth (processor sharing); a transfer's data arrives `latency_us` after its last
//! byte leaves. Time is an argument: [`LinkSim::start_transfer`] and [`LinkSim::advance_to`] take
//! `now_us`, nothing reads a clock, and the same calls give the same completions.
//!
//! Implementation: virtual time. `served_bytes` is what one continuously active transfer would have
//! received since the link was created; it grows at `bandwidth / active` per µs. A transfer that
//! starts when `served_bytes = S` with `b` bytes finishes when `served_bytes` reaches its tag `S + b`,
//! so transfers finish in tag order (ties by start order) and every event costs `O(log n)`.
//!
//! Invariants: `now_us` never decreases (a call with an earlier time is an error); bytes are
//! conserved (every started byte is delivered exactly once); completions are reported in
//! non-decreasing time order, ordered by tag.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::error::{FabricError, require_non_negative, require_positive};

/// Identifies a transfer on one [`LinkSim`]; ids increase in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u64);

/// A finished transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Its id.
    pub id: TransferId,
    /// When it started, µs.
    pub start_us: f64,
    /// Its size, bytes.
    pub bytes: f64,
    /// When its last byte left the link, µs.
    pub served_us: f64,
    /// When its last byte arrived (`served_us + latency_us`), µs.
    pub arrival_us: f64,
}

#[derive(Debug, Clone, Copy)]
struct Active {
    tag: f64,
    id: u64,
    start_us: f64,
    bytes: f64,
}

impl PartialEq for Active {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Active {}
impl PartialOrd for Active {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Active {
    // Reversed: BinaryHeap is a max-heap and we want the smallest (tag, id) on top.
    fn cmp(&self, other: &Self) -> Ordering {
        other.tag.total_cmp(&self.tag).then(other.id.cmp(&self.id))
    }
}

/// A processor-sharing link direction.
#[derive(Debug, Clone)]
pub struct LinkSim {
    bandwidth_bytes_per_us: f64,
    latency_us: f64,
    now_us: f64,
    served_bytes: f64,
    busy_us: f64,
    next_id: u64,
    bytes_started: f64,
    bytes_delivered: f64,
    active: BinaryHeap<Active>,
    finished: Vec<Transfer>,
}

impl LinkSim {
    /// A link of `bandwidth_bytes_per_s` with `latency_us`, idle at time 0.
    pub fn new(bandwidth_bytes_per_s: f64, latency_us: f64) -> Result<Self, FabricError> {
        require_positive("link", "bandwidth_bytes_per_s", bandwidth_bytes_per_s)?;
        require_non_negative("link", "latency_us", latency_us)?;
        Ok(Self {
            bandwidth_bytes_per_us: bandwidth_bytes_per_s / 1e6,
            latency_us,
            now_us: 0.0,
            served_bytes: 0.0,
            busy_us: 0.0,
            next_id: 0,
            bytes_started: 0.0,
            bytes_delivered: 0.0,
            active: BinaryHeap::new(),
            finished: Vec::new(),
        })
    }

    /// Starts a transfer of `bytes` at `now_us`. Transfers that finish before `now_us` are kept
    /// for the next [`LinkSim::advance_to`].
    pub fn start_transfer(&mut self, now_us: f64, bytes: f64) -> Result<TransferId, FabricError> {
        require_non_negative("link", "bytes", bytes)?;
        self.run_until(now_us)?;
        let id = self.next_id;
        self.next_id += 1;
        self.bytes_started += bytes;
        self.active.push(Active {
            tag: self.served_bytes + bytes,
            id,
            start_us: now_us,
            bytes,
        });
        Ok(TransferId(id))
    }

    /// Moves the link to `now_us` and returns the transfers whose last byte left at or before it,
    /// in completion order.
    pub fn advance_to(&mut self, now_us: f64) -> Result<Vec<Transfer>, FabricError> {
        self.run_until(now_us)?;
        Ok(std::mem::take(&mut self.finished))
    }

    /// Runs until no transfer is active and returns all finished transfers.
    pub fn finish_all(&mut self) -> Vec<Transfer> {
        while let Some(t) = self.next_completion_us() {
            // `t` is never before `now_us`, so this cannot fail.
            if self.run_until(t).is_err() {
                break;
            }
        }
        std::mem::take(&mut self.finished)
    }

    /// When the next active transfer would finish if nothing else starts.
    pub fn next_completion_us(&self) -> Option<f64> {
        self.active.peek().map(|top| {
            let n = self.active.len() as f64;
            self.now_us + (top.tag - self.served_bytes).max(0.0) * n / self.bandwidth_bytes_per_us
        })
    }

    /// The link's present time.
    pub fn now_us(&self) -> f64 {
        self.now_us
    }

    /// Transfers in progress.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Bytes started so far.
    pub fn bytes_started(&self) -> f64 {
        self.bytes_started
    }

    /// Bytes whose transfer has finished so far.
    pub fn bytes_delivered(&self) -> f64 {
        self.bytes_delivered
    }

    /// Time during which at least one transfer was active, µs.
    pub fn busy_us(&self) -> f64 {
        self.busy_us
    }

    fn run_until(&mut self, target_us: f64) -> Result<(), FabricError> {
        if target_us.is_nan() || target_us < self.now_us {
            return Err(FabricError::TimeWentBackwards {
                what: "link",
                asked_us: target_us,
                now_us: self.now_us,
            });
        }
        while let Some(top) = self.active.peek().copied() {
            let n = self.active.len() as f64;
            let remaining = (top.tag - self.served_bytes).max(0.0);
            let done_us = self.now_us + remaining * n / self.bandwidth_bytes_per_us;
            if done_us > target_us {
                let dt = target_us - self.now_us;
                self.served_bytes += dt * self.bandwidth_bytes_per_us / n;
                self.busy_us += dt;
                self.now_us = target_us;
                return Ok(());
            }
            self.busy_us += done_us - self.now_us;
            self.now_us = done_us;
            self.served_bytes = self.served_bytes.max(top.tag);
            self.active.pop();
            self.bytes_delivered += top.bytes;
            self.finished.push(Transfer {
                id: TransferId(top.id),
                start_us: top.start_us,
                bytes: top.bytes,
                served_us: done_us,
                arrival_us: done_us + self.latency_us,
            });
        }
        self.now_us = target_us;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_transfers_share_the_link_equally_until_the_smaller_finishes() {
        // 100 B/µs. A = 100 B and B = 300 B start at 0: both get 50 B/µs, so A is done at 2 µs
        // (B has 200 B left), then B alone at 100 B/µs needs 2 µs more: done at 4 µs. Latency 1 µs.
        let mut link = LinkSim::new(100e6, 1.0).unwrap();
        let a = link.start_transfer(0.0, 100.0).unwrap();
        let b = link.start_transfer(0.0, 300.0).unwrap();
        let done = link.finish_all();
        assert_eq!(done.len(), 2);
        assert_eq!(
            (done[0].id, done[0].served_us, done[0].arrival_us),
            (a, 2.0, 3.0)
        );
        assert_eq!((done[1].id, done[1].served_us), (b, 4.0));
        assert_eq!(link.busy_us(), 4.0);
    }

    #[test]
    fn a_late_transfer_slows_the_running_one_from_its_start() {
        // A = 400 B at 0 alone until 2 µs (200 B served); B = 100 B joins: 50 B/µs each, B is done
        // at 4 µs (A has 100 B left), then A alone: done at 5 µs.
        let mut link = LinkSim::new(100e6, 0.0).unwrap();
        link.start_transfer(0.0, 400.0).unwrap();
        assert!(link.advance_to(2.0).unwrap().is_empty());
        link.start_transfer(2.0, 100.0).unwrap();
        let done = link.advance_to(10.0).unwrap();
        let times: Vec<f64> = done.iter().map(|t| t.served_us).collect();
        assert_eq!(times, vec![4.0, 5.0]);
        assert_eq!(link.now_us(), 10.0);
    }

    #[test]
    fn going_back_in_time_is_an_error_not_a_panic() {
        let mut link = LinkSim::new(1e9, 0.0).unwrap();
        link.advance_to(5.0).unwrap();
        assert!(matches!(
            link.advance_to(4.0),
            Err(FabricError::TimeWentBackwards { .. })
        ));
        assert!(link.start_transfer(1.0, 10.0).is_err());
        assert!(link.start_transfer(6.0, -1.0).is_err());
    }

    #[test]
    fn zero_or_negative_bandwidth_is_refused() {
        assert!(LinkSim::new(0.0, 1.0).is_err());
        assert!(LinkSim::new(-5.0, 1.0).is_err());
        assert!(LinkSim::new(f64::NAN, 1.0).is_err());
    }

    #[test]
    fn a_zero_byte_transfer_finishes_at_once_after_latency() {
        let mut link = LinkSim::new(1e9, 2.5).unwrap();
        link.start_transfer(3.0, 0.0).unwrap();
        let done = link.advance_to(3.0).unwrap();
        assert_eq!((done[0].served_us, done[0].arrival_us), (3.0, 5.5));
    }
}
