//! One collective (a dispatch or a combine) on the fabric, given when each GPU issues it.
//!
//! Model (the `detailed` mode):
//! - Each GPU owns four link directions (NIC tx/rx, NVLink tx/rx); switches do not block. A flow
//!   uses its source's tx and its destination's rx link; each link is shared by its flows in
//!   processor sharing, tracked per link independently (a flow is done when both of its links have
//!   served it), and its data lands one link latency after it is served.
//! - A GPU starts all its flows of the collective when it issues it, so its tx flows start
//!   together: their finish times follow from sizes alone (see [`simultaneous_finish`]).
//! - Receivers only need their last arrival. On an rx link that is the link's makespan (the same
//!   for every work-conserving discipline) plus the latency, computed by one sweep over the GPUs
//!   in issue order; when an rx link's flows have different latencies (several leaves or planes),
//!   the link is run as a [`LinkSim`] to get every flow's own finish. A collective thus costs
//!   `O(flows + GPUs log GPUs)`.
//! - Forwarding (DeepEP): a forwarder's NVLink flows start when it issues and are pipelined behind
//!   the NIC: a forwarded flow cannot finish before the forwarder's last NIC arrival. In a
//!   combine, the NVLink stage comes first and each NIC flow waits for its forwarder's last NVLink
//!   arrival (the reduction).
//! - A GPU has *received* the collective when all flows into it have arrived (and it has issued
//!   it); its comm stream is *idle* when it has also put all its own flows on the wire.
//!
//! In the `analysis` mode every routed copy plus the shared-expert copy of every token crosses one
//! link at its nominal bandwidth with no latency, local copies included (the paper's formula), and
//! the collective ends for everyone when the busiest GPU has moved `max(sent, received)` bytes.
//!
//! Invariants: `received_us[g] >= issue_us[g]` and `idle_us[g] >= received_us[g]`; where every
//! receive link's flows share one latency (always inside one leaf and plane), every output is a
//! non-decreasing function of every issue time, so issuing earlier never delays a collective.

use serde::Serialize;

use crate::link::LinkSim;
use crate::plan::{FlowSet, TrafficPlan};
use crate::topology::LinkClass;

/// Dispatch (tokens to experts) or combine (results back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CollectiveKind {
    /// Tokens to expert GPUs.
    Dispatch,
    /// Expert outputs back to the tokens' GPUs.
    Combine,
}

/// How collectives are charged.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CommModel {
    /// The paper's assumptions.
    Analysis {
        /// Nominal bandwidth of the EP link, bytes/µs.
        bytes_per_us: f64,
        /// Bytes per token copy in a dispatch.
        dispatch_bytes: f64,
        /// Bytes per token copy in a combine.
        combine_bytes: f64,
    },
    /// Topology, forwarding, contention and latency.
    Detailed {
        /// NIC bandwidth per direction, bytes/µs.
        nic_bytes_per_us: f64,
        /// NVLink bandwidth per direction, bytes/µs.
        nvlink_bytes_per_us: f64,
        /// Bytes per token copy in a dispatch (payload and scales).
        dispatch_bytes: f64,
        /// Bytes per token copy in a combine.
        combine_bytes: f64,
    },
}

/// Busy interval of one link in one collective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkBusy {
    /// GPU owning the link.
    pub gpu: u32,
    /// Which of its links.
    pub class: LinkClass,
    /// First flow start, µs.
    pub start_us: f64,
    /// Last flow served, µs.
    pub end_us: f64,
    /// Bytes carried.
    pub bytes: f64,
}

/// The outcome of one collective.
#[derive(Debug, Clone, Default)]
pub struct CollectiveResult {
    /// When each GPU has all its incoming data, µs.
    pub received_us: Vec<f64>,
    /// When each GPU's comm stream is free for the next collective, µs.
    pub idle_us: Vec<f64>,
    /// Bytes over NICs.
    pub nic_bytes: f64,
    /// Bytes over NVLink.
    pub nvlink_bytes: f64,
    /// Per-link busy intervals (only when asked for).
    pub links: Vec<LinkBusy>,
}

/// Finish times of flows that start together at `t0_us` on one processor-sharing link, given
/// their sizes in ascending order: flow `j` of `k` finishes at
/// `t0 + (Σ_{i<j} b_i + (k − j) · b_j) / bandwidth`.
pub fn simultaneous_finish(
    t0_us: f64,
    sorted_bytes: &[f64],
    bytes_per_us: f64,
    out: &mut Vec<f64>,
) {
    out.clear();
    let k = sorted_bytes.len();
    let mut prefix = 0.0;
    for (j, &b) in sorted_bytes.iter().enumerate() {
        out.push(t0_us + (prefix + (k - j) as f64 * b) / bytes_per_us);
        prefix += b;
    }
}

/// Everything one collective needs besides the plan and the issue times.
#[derive(Debug)]
pub(crate) struct CollectiveSim<'a> {
    /// How to charge.
    pub model: &'a CommModel,
    /// Record per-link busy intervals.
    pub record_links: bool,
}

/// One link layer's parameters inside [`CollectiveSim::run`].
struct Stage<'p> {
    flows: &'p FlowSet,
    reverse: bool,
    class_tx: LinkClass,
    class_rx: LinkClass,
    bytes_per_unit: f64,
    bytes_per_us: f64,
}

impl CollectiveSim<'_> {
    /// Runs `kind` of `plan` with GPU `g` issuing at `issue_us[g]`.
    pub fn run(
        &self,
        plan: &TrafficPlan,
        kind: CollectiveKind,
        issue_us: &[f64],
    ) -> CollectiveResult {
        match *self.model {
            CommModel::Analysis {
                bytes_per_us,
                dispatch_bytes,
                combine_bytes,
            } => {
                let per_copy = match kind {
                    CollectiveKind::Dispatch => dispatch_bytes,
                    CollectiveKind::Combine => combine_bytes,
                };
                analysis(plan, issue_us, per_copy, bytes_per_us)
            }
            CommModel::Detailed {
                nic_bytes_per_us,
                nvlink_bytes_per_us,
                dispatch_bytes,
                combine_bytes,
            } => {
                let per_copy = match kind {
                    CollectiveKind::Dispatch => dispatch_bytes,
                    CollectiveKind::Combine => combine_bytes,
                };
                let reverse = kind == CollectiveKind::Combine;
                let nic = Stage {
                    flows: &plan.nic,
                    reverse,
                    class_tx: LinkClass::NicTx,
                    class_rx: LinkClass::NicRx,
                    bytes_per_unit: per_copy,
                    bytes_per_us: nic_bytes_per_us,
                };
                let nvl = Stage {
                    flows: &plan.nvlink,
                    reverse,
                    class_tx: LinkClass::NvlinkTx,
                    class_rx: LinkClass::NvlinkRx,
                    bytes_per_unit: per_copy,
                    bytes_per_us: nvlink_bytes_per_us,
                };
                self.detailed(plan.num_gpus(), issue_us, &nic, &nvl, kind)
            }
        }
    }

    fn detailed(
        &self,
        n: usize,
        issue_us: &[f64],
        nic: &Stage<'_>,
        nvl: &Stage<'_>,
        kind: CollectiveKind,
    ) -> CollectiveResult {
        let mut out = CollectiveResult {
            received_us: issue_us.to_vec(),
            idle_us: issue_us.to_vec(),
            ..CollectiveResult::default()
        };
        // GPUs in issue order (ties: index), so every rx link sees its flows in start order.
        // Keys in `f64::total_cmp` order (sign-magnitude to two's complement), then the index.
        let mut keyed: Vec<(i64, u32)> = issue_us
            .iter()
            .enumerate()
            .map(|(g, t)| {
                let bits = t.to_bits() as i64;
                (bits ^ ((((bits >> 63) as u64) >> 1) as i64), g as u32)
            })
            .collect();
        keyed.sort_unstable();
        let order: Vec<u32> = keyed.iter().map(|&(_, g)| g).collect();
        let mut scratch = Scratch::new(n);
        let (first, second) = match kind {
            CollectiveKind::Dispatch => (nic, nvl),
            CollectiveKind::Combine => (nvl, nic),
        };
        let none = vec![f64::NEG_INFINITY; n];
        self.stage(first, issue_us, &order, &none, &mut out, &mut scratch);
        let first_in = std::mem::replace(&mut scratch.arrival, vec![f64::NEG_INFINITY; n]);
        self.stage(second, issue_us, &order, &first_in, &mut out, &mut scratch);
        for (g, (&a, &b)) in first_in.iter().zip(&scratch.arrival).enumerate() {
            let r = out.received_us[g].max(a).max(b);
            out.received_us[g] = r;
            out.idle_us[g] = out.idle_us[g].max(r);
        }
        out
    }

    /// Runs one link layer, leaving in `scratch.arrival[g]` the last arrival at GPU `g` over this
    /// layer (−∞ when nothing arrives). A flow that waits (forwarded in a dispatch, every NIC flow
    /// in a combine) cannot finish before `ready_us[tx GPU]`.
    fn stage(
        &self,
        st: &Stage<'_>,
        issue_us: &[f64],
        order: &[u32],
        ready_us: &[f64],
        out: &mut CollectiveResult,
        scratch: &mut Scratch,
    ) {
        let n = issue_us.len();
        let f = st.flows;
        // In a combine the flows run backwards: tx groups are the dispatch destinations.
        let (packed, tx_off, rx_flows, rx_off, rx_latency) = if st.reverse {
            (
                &f.by_dst,
                &f.dst_offsets,
                &f.by_src,
                &f.src_offsets,
                &f.src_latency_us,
            )
        } else {
            (
                &f.by_src,
                &f.src_offsets,
                &f.by_dst,
                &f.dst_offsets,
                &f.dst_latency_us,
            )
        };
        let waits_all = st.reverse && st.class_tx == LinkClass::NicTx;
        scratch.reset();
        let bpu = st.bytes_per_unit;
        let inv_bw = 1.0 / st.bytes_per_us;
        let mut total = 0.0;
        for &g in order {
            let g = g as usize;
            let group = &packed[tx_off[g] as usize..tx_off[g + 1] as usize];
            if group.is_empty() {
                continue;
            }
            let t0 = issue_us[g];
            let ready = ready_us[g];
            let k = group.len();
            let mut prefix = 0.0;
            for (j, flow) in group.iter().enumerate() {
                let bytes = f64::from(flow.units) * bpu;
                // Flows of one GPU start together: ascending sizes finish in order (see
                // `simultaneous_finish`).
                let served = t0 + (prefix + (k - j) as f64 * bytes) * inv_bw;
                prefix += bytes;
                let done = if waits_all || flow.forwarded {
                    later(served, ready)
                } else {
                    served
                };
                let dst = flow.rx as usize;
                scratch.arrival[dst] = later(scratch.arrival[dst], done + f.latency_us(flow));
                // Receive side: a work-conserving sweep in start order gives the link's makespan.
                scratch.rx_end[dst] = later(scratch.rx_end[dst], t0) + bytes * inv_bw;
                if self.record_links {
                    if scratch.rx_first[dst].is_nan() {
                        scratch.rx_first[dst] = t0;
                    }
                    scratch.rx_bytes[dst] += bytes;
                }
            }
            total += prefix;
            let tx_done = t0 + prefix * inv_bw;
            out.idle_us[g] = out.idle_us[g].max(tx_done);
            if self.record_links {
                out.links.push(LinkBusy {
                    gpu: g as u32,
                    class: st.class_tx,
                    start_us: t0,
                    end_us: tx_done,
                    bytes: prefix,
                });
            }
        }
        match st.class_tx {
            LinkClass::NicTx => out.nic_bytes += total,
            _ => out.nvlink_bytes += total,
        }
        for g in 0..n {
            let last_served = scratch.rx_end[g];
            if last_served == f64::NEG_INFINITY {
                continue;
            }
            let shared = rx_latency[g];
            let last_arrival = if shared.is_nan() {
                // Flows with different latencies: run the link to get each flow's own finish.
                // In the other grouping, `rx` is the transmitting end.
                scratch.starts.clear();
                scratch.starts.extend(
                    rx_flows[rx_off[g] as usize..rx_off[g + 1] as usize]
                        .iter()
                        .map(|flow| {
                            (
                                issue_us[flow.rx as usize],
                                f64::from(flow.units) * bpu,
                                f.latency_us(flow),
                            )
                        }),
                );
                rx_with_link(&mut scratch.starts, st.bytes_per_us)
            } else {
                last_served + shared
            };
            scratch.arrival[g] = scratch.arrival[g].max(last_arrival);
            if self.record_links {
                out.links.push(LinkBusy {
                    gpu: g as u32,
                    class: st.class_rx,
                    start_us: scratch.rx_first[g],
                    end_us: last_served,
                    bytes: scratch.rx_bytes[g],
                });
            }
        }
    }
}

/// The later of two times in the transmit loop: one comparison (times there are never NaN),
/// where `f64::max` also handles NaN.
#[inline(always)]
fn later(a: f64, b: f64) -> f64 {
    if b > a { b } else { a }
}

/// Per-link state of one stage.
#[derive(Debug)]
struct Scratch {
    arrival: Vec<f64>,
    rx_end: Vec<f64>,
    rx_first: Vec<f64>,
    rx_bytes: Vec<f64>,
    starts: Vec<(f64, f64, f64)>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Self {
            arrival: vec![f64::NEG_INFINITY; n],
            rx_end: vec![f64::NEG_INFINITY; n],
            rx_first: vec![f64::NAN; n],
            rx_bytes: vec![0.0; n],
            starts: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.arrival.fill(f64::NEG_INFINITY);
        self.rx_end.fill(f64::NEG_INFINITY);
        self.rx_first.fill(f64::NAN);
        self.rx_bytes.fill(0.0);
    }
}

/// The last arrival on one rx link whose flows have different latencies, from each flow's own
/// processor-sharing finish.
fn rx_with_link(flows: &mut [(f64, f64, f64)], bytes_per_us: f64) -> f64 {
    flows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first = flows.first().map_or(0.0, |f| f.0);
    let Ok(mut link) = LinkSim::new(bytes_per_us * 1e6, 0.0) else {
        return first;
    };
    let mut latency_of = Vec::with_capacity(flows.len());
    let mut last_arrival = f64::NEG_INFINITY;
    for &(start, bytes, lat) in flows.iter() {
        // Starts are sorted, so time never goes back; a failure would mean NaN input.
        if link.start_transfer(start.max(link.now_us()), bytes).is_ok() {
            latency_of.push(lat);
        }
    }
    for t in link.finish_all() {
        let lat = latency_of.get(t.id.0 as usize).copied().unwrap_or(0.0);
        last_arrival = last_arrival.max(t.served_us + lat);
    }
    last_arrival
}

fn analysis(
    plan: &TrafficPlan,
    issue_us: &[f64],
    per_copy: f64,
    bytes_per_us: f64,
) -> CollectiveResult {
    let mut end = f64::NEG_INFINITY;
    let mut moved = 0.0;
    for (g, &issue) in issue_us.iter().enumerate().take(plan.num_gpus()) {
        // The shared expert counts as a ninth copy, sent and received by the token's own GPU.
        let sent = f64::from(plan.copies_out[g] + plan.tokens[g]);
        let received = f64::from(plan.pairs[g] + plan.tokens[g]);
        moved += sent * per_copy;
        end = end.max(issue + sent.max(received) * per_copy / bytes_per_us);
    }
    let received_us: Vec<f64> = issue_us.iter().map(|&t| t.max(end)).collect();
    CollectiveResult {
        idle_us: received_us.clone(),
        received_us,
        nic_bytes: moved,
        nvlink_bytes: 0.0,
        links: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simultaneous_finish_matches_the_link_simulation() {
        let sizes = [10.0, 10.0, 40.0, 100.0];
        let mut out = Vec::new();
        simultaneous_finish(5.0, &sizes, 2.0, &mut out);
        let mut link = LinkSim::new(2e6, 0.0).unwrap();
        link.advance_to(5.0).unwrap();
        for &b in &sizes {
            link.start_transfer(5.0, b).unwrap();
        }
        let done: Vec<f64> = link.finish_all().iter().map(|t| t.served_us).collect();
        for (a, b) in out.iter().zip(&done) {
            assert!((a - b).abs() < 1e-9, "{out:?} vs {done:?}");
        }
        // Work conservation: the last finishes when all 160 bytes have gone at 2 B/µs.
        assert_eq!(out[3], 5.0 + 80.0);
    }
}
