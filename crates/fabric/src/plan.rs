//! Traffic plans: what one micro-batch's routing asks of the fabric.
//!
//! A [`TrafficPlan`] turns a routing (token → experts) and a placement (expert → GPUs) into the
//! flows of a dispatch, aggregated per (source, destination) link pair: every message between the
//! same two GPUs in one collective starts together (when the source issues the collective) and is
//! charged as one flow, which under processor sharing finishes exactly when its last message would.
//! The combine is the same plan in reverse with BF16 payloads.
//!
//! Paths:
//! - [`DispatchPath::Forwarded`] (DeepEP's normal kernels, DeepSeek-V3 TR §3.2.2): a token crosses
//!   the NIC once per target NVLink domain, to the GPU with its own in-domain index there, which
//!   forwards it over NVLink to each target GPU of that domain. Copies are deduplicated per
//!   (token, domain) on the NIC and per (token, GPU) on NVLink; targets in the token's own domain
//!   are reached over NVLink directly; a target on the token's own GPU is free.
//! - [`DispatchPath::Direct`] (DeepEP's low-latency kernels as first released, "pure RDMA"): every
//!   (token, expert) copy whose expert is on another GPU crosses the NIC to that GPU; no
//!   deduplication.
//!
//! Replica choice (an expert with several copies): the copy on the token's GPU, else the first copy
//! in the token's NVLink domain, else copy `(token + source + expert) mod copies` — unless the
//! routing names the serving GPU of each copy ([`LayerRouting::with_gpus`]), which is then used.
//!
//! Counting is done by [`crate::tally`] (the hot loop of a step with many routing layers), which
//! falls back to the copy-by-copy reference loop here for routings that name serving GPUs or
//! unknown experts; the two give identical counts (property-tested).
//!
//! Invariant: Σ NIC units and Σ NVLink units equal the copies the path moves (checked in tests),
//! and `pairs` sums to tokens × top_k.

use serde::{Deserialize, Serialize};

use crate::error::FabricError;
use crate::placement::ExpertPlacement;
use crate::routing::LayerRouting;
use crate::tally;
use crate::topology::Topology;

/// How dispatch reaches GPUs in other NVLink domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DispatchPath {
    /// NIC to the same in-domain index, then NVLink (DeepEP normal kernels).
    Forwarded,
    /// Every copy over the NIC straight to the expert's GPU (DeepEP low-latency V1).
    Direct,
}

/// Flows of one link layer, aggregated per GPU pair, in dispatch direction, grouped twice: by
/// source (the transmit groups of a dispatch) and by destination (those of a combine, whose flows
/// run backwards). Within a group flows are in ascending `(units, other end)` order.
#[derive(Debug, Clone, Default)]
pub struct FlowSet {
    /// `by_src[src_offsets[g]..src_offsets[g + 1]]` are GPU `g`'s outgoing flows.
    pub src_offsets: Vec<u32>,
    /// The flows grouped by source; `rx` is the destination.
    pub by_src: Vec<PackedFlow>,
    /// `by_dst[dst_offsets[g]..dst_offsets[g + 1]]` are GPU `g`'s incoming flows.
    pub dst_offsets: Vec<u32>,
    /// The flows grouped by destination; `rx` is the source (the receiver in a combine).
    pub by_dst: Vec<PackedFlow>,
    /// Per GPU: the latency shared by all its outgoing flows, NaN when they differ or it has none.
    pub src_latency_us: Vec<f64>,
    /// Per GPU: the latency shared by all its incoming flows, NaN when they differ or it has none.
    pub dst_latency_us: Vec<f64>,
    /// The distinct hop latencies, µs, that [`PackedFlow::latency`] indexes.
    pub latencies_us: Vec<f64>,
}

/// One flow as a transmit loop reads it: 12 bytes, no indirection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedFlow {
    /// Token copies.
    pub units: u32,
    /// The GPU at the other end in this grouping.
    pub rx: u32,
    /// Whether it carries data that first arrived over the NIC (forwarding).
    pub forwarded: bool,
    /// Its hop latency: an index into [`FlowSet::latencies_us`] (symmetric: the same in a
    /// combine).
    pub latency: u8,
}

/// One flow in dispatch direction, as [`FlowSet::flows`] lists it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flow {
    /// Sending GPU.
    pub src: u32,
    /// Receiving GPU.
    pub dst: u32,
    /// Token copies.
    pub units: u32,
    /// Whether it carries forwarded data.
    pub forwarded: bool,
    /// Hop latency, µs.
    pub latency_us: f64,
}

/// A count matrix to turn into flows: `units[s * cols + c]` copies from GPU `s` to column `c`.
struct Matrix<'a, D, F> {
    units: &'a [u32],
    cols: usize,
    /// The destination GPU of cell `(s, c)`.
    dst: D,
    /// Whether cell `i` carries forwarded data, and its hop latency as an index into
    /// `latencies_us`.
    flags: F,
    /// The hop latencies, µs (at most 256).
    latencies_us: Vec<f64>,
}

impl FlowSet {
    /// The flows of the non-empty cells of `m` (at most [`Topology::MAX_GPUS`] rows and columns).
    /// The cells are counted into both groupings by one stable counting sort on units (cells in
    /// row-major order, so ties go by the other end).
    #[inline(never)]
    fn from_matrix<D, F>(num_gpus: usize, m: Matrix<'_, D, F>) -> Self
    where
        D: Fn(u32, u32) -> u32,
        F: Fn(usize, u32, u32) -> (bool, usize),
    {
        // Non-empty cells as (s << 16 | c), row-major (GPUs and columns fit 16 bits:
        // `Topology::MAX_GPUS`); endpoint counts.
        let mut cells = Vec::with_capacity(m.units.len() / 2);
        let mut src_offsets = vec![0u32; num_gpus + 1];
        let mut dst_offsets = vec![0u32; num_gpus + 1];
        let max_units = m.units.iter().copied().max().unwrap_or(0);
        for (s, row) in m.units.chunks_exact(m.cols).enumerate() {
            for (c, &u) in row.iter().enumerate() {
                if u > 0 {
                    let (s, c) = (s as u32, c as u32);
                    cells.push(s << 16 | c);
                    src_offsets[s as usize + 1] += 1;
                    dst_offsets[(m.dst)(s, c) as usize + 1] += 1;
                }
            }
        }
        for g in 0..num_gpus {
            src_offsets[g + 1] += src_offsets[g];
            dst_offsets[g + 1] += dst_offsets[g];
        }
        let unit_of =
            |cell: u32| m.units[(cell >> 16) as usize * m.cols + (cell & 0xffff) as usize];
        let order = by_units(&cells, unit_of, max_units);
        let blank = PackedFlow {
            units: 0,
            rx: 0,
            forwarded: false,
            latency: 0,
        };
        assert!(
            m.latencies_us.len() <= 256,
            "a flow set indexes at most 256 latencies"
        );
        let mut set = FlowSet {
            by_src: vec![blank; cells.len()],
            by_dst: vec![blank; cells.len()],
            latencies_us: m.latencies_us,
            ..FlowSet::default()
        };
        let mut src_fill = src_offsets.clone();
        let mut dst_fill = dst_offsets.clone();
        for cell in order {
            let (s, c) = (cell >> 16, cell & 0xffff);
            let i = s as usize * m.cols + c as usize;
            let d = (m.dst)(s, c);
            let (forwarded, latency) = (m.flags)(i, s, d);
            let flow = PackedFlow {
                units: m.units[i],
                rx: d,
                forwarded,
                latency: latency as u8,
            };
            set.by_src[src_fill[s as usize] as usize] = flow;
            src_fill[s as usize] += 1;
            set.by_dst[dst_fill[d as usize] as usize] = PackedFlow { rx: s, ..flow };
            dst_fill[d as usize] += 1;
        }
        set.src_latency_us = set.shared_latency(&set.by_src, &src_offsets);
        set.dst_latency_us = set.shared_latency(&set.by_dst, &dst_offsets);
        set.src_offsets = src_offsets;
        set.dst_offsets = dst_offsets;
        set
    }

    /// Per group: the latency all its flows share, or NaN when they differ (or it is empty).
    fn shared_latency(&self, flows: &[PackedFlow], offsets: &[u32]) -> Vec<f64> {
        offsets
            .windows(2)
            .map(|w| {
                let group = &flows[w[0] as usize..w[1] as usize];
                // By value: two classes may have the same latency.
                match group.first().map(|f| self.latency_us(f)) {
                    Some(l) if group.iter().all(|f| self.latency_us(f) == l) => l,
                    _ => f64::NAN,
                }
            })
            .collect()
    }

    /// A flow's hop latency, µs.
    pub fn latency_us(&self, flow: &PackedFlow) -> f64 {
        self.latencies_us[flow.latency as usize]
    }

    /// Every flow in dispatch direction, by source, in group order.
    pub fn flows(&self) -> impl Iterator<Item = Flow> + '_ {
        self.src_offsets
            .windows(2)
            .enumerate()
            .flat_map(move |(s, w)| {
                self.by_src[w[0] as usize..w[1] as usize]
                    .iter()
                    .map(move |f| Flow {
                        src: s as u32,
                        dst: f.rx,
                        units: f.units,
                        forwarded: f.forwarded,
                        latency_us: self.latency_us(f),
                    })
            })
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.by_src.len()
    }

    /// True when there is no flow.
    pub fn is_empty(&self) -> bool {
        self.by_src.is_empty()
    }

    /// Total token copies.
    pub fn total_units(&self) -> u64 {
        self.by_src.iter().map(|f| u64::from(f.units)).sum()
    }
}

/// `cells` in ascending `(units, position)` order: a stable counting sort when the units are
/// small (always, for the token copies of one micro-batch), a comparison sort otherwise.
fn by_units(cells: &[u32], units: impl Fn(u32) -> u32, max_units: u32) -> Vec<u32> {
    let max_units = max_units as usize;
    if max_units <= 4 * cells.len() + 64 {
        let mut start = vec![0u32; max_units + 2];
        for &cell in cells {
            start[units(cell) as usize + 1] += 1;
        }
        for u in 0..=max_units {
            start[u + 1] += start[u];
        }
        let mut order = vec![0u32; cells.len()];
        for &cell in cells {
            let u = units(cell) as usize;
            order[start[u] as usize] = cell;
            start[u] += 1;
        }
        return order;
    }
    // (units, cell) in one integer: cells are row-major, so their order is their position's.
    let mut keyed: Vec<u64> = cells
        .iter()
        .map(|&cell| (u64::from(units(cell)) << 32) | u64::from(cell))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|k| k as u32).collect()
}

/// One micro-batch's traffic and expert load.
#[derive(Debug, Clone)]
pub struct TrafficPlan {
    /// The path the flows follow.
    pub path: DispatchPath,
    /// Tokens each GPU sends (its micro-batch tokens).
    pub tokens: Vec<u32>,
    /// NIC flows (dispatch direction).
    pub nic: FlowSet,
    /// NVLink flows (dispatch direction).
    pub nvlink: FlowSet,
    /// (token, expert) pairs each GPU computes in its MLP stage.
    pub pairs: Vec<u32>,
    /// Distinct local experts with at least one token, per GPU.
    pub active_experts: Vec<u32>,
    /// Routed copies each GPU sends, local ones included (`tokens × top_k`).
    pub copies_out: Vec<u32>,
}

impl TrafficPlan {
    /// The plan of tokens `ranges[r]` of each rank `r` of `routing`; an expert id the placement
    /// does not know is an error naming `origin` and the token. `routing` must cover the
    /// topology's ranks and `placement` its GPUs ([`Fabric::plan`](crate::Fabric::plan) checks).
    pub fn build(
        topology: &Topology,
        placement: &ExpertPlacement,
        routing: &LayerRouting,
        ranges: &[(usize, usize)],
        path: DispatchPath,
        origin: &str,
    ) -> Result<Self, FabricError> {
        let n = topology.num_gpus() as usize;
        let dg = topology.domain_gpus() as usize;
        let dom = topology.domains();
        let idx = topology.indices_in_domain();
        let experts = ExpertTable::new(placement, dom, idx);
        let direct = path == DispatchPath::Direct;
        let counts = match tally::count(topology, &experts, routing, ranges, direct) {
            Some(counts) => counts,
            None => reference_counts(topology, &experts, routing, ranges, direct, origin)?,
        };
        let Counts {
            nic,
            nic_cols,
            nvl,
            nvl_fwd,
            hits,
            tokens,
            copies_out,
        } = counts;
        let mut pairs = vec![0u32; n];
        let mut active_experts = vec![0u32; n];
        for (slot, &h) in hits.iter().enumerate() {
            let g = experts.slot_gpu[slot] as usize;
            pairs[g] += h;
            active_experts[g] += u32::from(h > 0);
        }
        let nic_flows = FlowSet::from_matrix(
            n,
            Matrix {
                units: &nic,
                cols: nic_cols,
                dst: |s, col| {
                    if direct {
                        col
                    } else {
                        topology.forwarder(s, col)
                    }
                },
                flags: |_, s, d| (false, topology.nic_latency_class(s, d)),
                latencies_us: topology.nic_latencies_us().to_vec(),
            },
        );
        let nvlink_us = topology.nvlink_latency_us();
        let nvl_flows = FlowSet::from_matrix(
            n,
            Matrix {
                units: &nvl,
                cols: dg,
                dst: |s, i| dom[s as usize] * dg as u32 + i,
                flags: |cell, _, _| (nvl_fwd[cell] > 0, 0),
                latencies_us: vec![nvlink_us],
            },
        );
        Ok(Self {
            path,
            tokens,
            nic: nic_flows,
            nvlink: nvl_flows,
            pairs,
            active_experts,
            copies_out,
        })
    }

    /// GPUs covered.
    pub fn num_gpus(&self) -> usize {
        self.tokens.len()
    }
}

/// What the counting loop of a plan produces (dispatch direction).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Copies per (source, column): column = target domain (forwarded) or GPU (direct).
    pub nic: Vec<u32>,
    /// Columns of `nic`.
    pub nic_cols: usize,
    /// NVLink hops per (sender, in-domain index of the receiver).
    pub nvl: Vec<u32>,
    /// The forwarded part of `nvl`.
    pub nvl_fwd: Vec<u32>,
    /// Copies per expert slot.
    pub hits: Vec<u32>,
    /// Tokens each GPU sends.
    pub tokens: Vec<u32>,
    /// Routed copies each GPU sends, local ones included.
    pub copies_out: Vec<u32>,
}

/// The counting loop, copy by copy, with deduplication stamps: the rule as the module doc states
/// it, for every routing (explicit serving GPUs, unknown expert ids reported with their token).
/// [`tally::count`] gives the same counts faster where it applies.
pub(crate) fn reference_counts(
    topology: &Topology,
    experts: &ExpertTable,
    routing: &LayerRouting,
    ranges: &[(usize, usize)],
    direct: bool,
    origin: &str,
) -> Result<Counts, FabricError> {
    let n = topology.num_gpus() as usize;
    let domains = topology.num_domains() as usize;
    let dg = topology.domain_gpus() as usize;
    let dom = topology.domains();
    let idx = topology.indices_in_domain();
    let top_k = routing.top_k();
    let mut hits = vec![0u32; experts.slot_gpu.len()];
    let mut tokens = vec![0u32; n];
    let mut copies_out = vec![0u32; n];
    let nic_cols = if direct { n } else { domains };
    let mut nic = vec![0u32; n * nic_cols];
    let mut nvl = vec![0u32; n * dg];
    let mut nvl_fwd = vec![0u32; n * dg];
    // Deduplication stamps: GPU `g` (domain `d`) already counted for the current token.
    let mut gpu_stamp = vec![u32::MAX; n];
    let mut domain_stamp = vec![u32::MAX; domains];
    let mut token_id = 0u32;
    for (src, &(lo, hi)) in ranges.iter().enumerate().take(n) {
        let s = src as u32;
        let s_domain = dom[src];
        let s_index = idx[src] as usize;
        tokens[src] = (hi - lo) as u32;
        copies_out[src] = ((hi - lo) * top_k) as u32;
        let ids = routing.experts_of(src, lo..hi);
        let gpus = routing.gpus_of(src, lo..hi);
        for (t, chosen) in ids.chunks(top_k).enumerate() {
            token_id = token_id.wrapping_add(1);
            for (j, &e) in chosen.iter().enumerate() {
                let e = usize::from(e);
                let Some(&one) = experts.single.get(e) else {
                    return Err(FabricError::invalid(
                        origin,
                        format!("rank {src} token {}", lo + t),
                        format!("chooses expert {e}, which the placement does not have"),
                    ));
                };
                let given = gpus
                    .and_then(|g| g.get(t * top_k + j).copied())
                    .filter(|&g| g != LayerRouting::ANY_GPU);
                let copy = if let Some(g) = given {
                    experts.on_gpu(e, g, dom, idx).ok_or_else(|| {
                        FabricError::invalid(
                            origin,
                            format!("rank {src} token {} gpus[{j}]", lo + t),
                            format!("sends expert {e} to GPU {g}, which holds no copy of it"),
                        )
                    })?
                } else if one.slot != u32::MAX {
                    one
                } else {
                    experts.choose(e, s, s_domain, dom, idx, lo + t + src + e)
                };
                let gi = copy.gpu as usize;
                hits[copy.slot as usize] += 1;
                if direct {
                    nic[src * nic_cols + gi] += u32::from(copy.gpu != s);
                    continue;
                }
                // Branch-free on purpose (routing is random, branches would mispredict):
                // every update adds 0 when it does not apply.
                let new_gpu = gpu_stamp[gi] != token_id && copy.gpu != s;
                gpu_stamp[gi] = token_id;
                let d = copy.domain as usize;
                let local_domain = copy.domain == s_domain;
                let new_domain = new_gpu && !local_domain && domain_stamp[d] != token_id;
                domain_stamp[d] = token_id;
                nic[src * nic_cols + d] += u32::from(new_domain);
                // Same domain: straight over NVLink from the source; else from the forwarder.
                let from = if local_domain { src } else { d * dg + s_index };
                let hop = new_gpu && from != gi;
                let cell = from * dg + copy.index as usize;
                nvl[cell] += u32::from(hop);
                nvl_fwd[cell] += u32::from(hop && !local_domain);
            }
        }
    }
    Ok(Counts {
        nic,
        nic_cols,
        nvl,
        nvl_fwd,
        hits,
        tokens,
        copies_out,
    })
}

/// Where one expert copy lives, resolved for the hot loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Copy {
    slot: u32,
    gpu: u32,
    domain: u32,
    index: u32,
}

/// Expert copies flattened for the hot loop: expert `e`'s copies are slots
/// `base[e]..base[e + 1]`, slot `j` on GPU `slot_gpu[j]`; `single[e]` resolves an expert with
/// one copy in one load (`slot == u32::MAX` when it has several).
pub(crate) struct ExpertTable {
    pub(crate) base: Vec<usize>,
    pub(crate) slot_gpu: Vec<u32>,
    pub(crate) single: Vec<Copy>,
}

impl ExpertTable {
    pub(crate) fn new(placement: &ExpertPlacement, domains: &[u32], indices: &[u32]) -> Self {
        let mut base = Vec::with_capacity(placement.num_experts() + 1);
        let mut slot_gpu = Vec::with_capacity(placement.total_slots());
        let mut single = Vec::with_capacity(placement.num_experts());
        base.push(0);
        for e in 0..placement.num_experts() {
            let copies = placement.gpus_of(e);
            let g = copies.first().copied().unwrap_or(0);
            let slot = if copies.len() == 1 {
                slot_gpu.len() as u32
            } else {
                u32::MAX
            };
            single.push(Copy {
                slot,
                gpu: g,
                domain: domains[g as usize],
                index: indices[g as usize],
            });
            slot_gpu.extend_from_slice(copies);
            base.push(slot_gpu.len());
        }
        Self {
            base,
            slot_gpu,
            single,
        }
    }

    /// Expert `e`'s copy on GPU `gpu`, if it has one there.
    fn on_gpu(&self, e: usize, gpu: u32, domains: &[u32], indices: &[u32]) -> Option<Copy> {
        let (lo, hi) = (*self.base.get(e)?, *self.base.get(e + 1)?);
        let j = self.slot_gpu.get(lo..hi)?.iter().position(|&g| g == gpu)?;
        Some(Copy {
            slot: (lo + j) as u32,
            gpu,
            domain: *domains.get(gpu as usize)?,
            index: *indices.get(gpu as usize)?,
        })
    }

    /// The copy serving expert `e` (several copies) for a token on `src`: the copy on `src`,
    /// else the first in `src`'s domain, else copy `key mod copies`.
    fn choose(
        &self,
        e: usize,
        src: u32,
        src_domain: u32,
        domains: &[u32],
        indices: &[u32],
        key: usize,
    ) -> Copy {
        let (lo, hi) = (self.base[e], self.base[e + 1]);
        let copies = &self.slot_gpu[lo..hi];
        let j = copies
            .iter()
            .position(|&g| g == src)
            .or_else(|| {
                copies
                    .iter()
                    .position(|&g| domains[g as usize] == src_domain)
            })
            .unwrap_or(key % copies.len());
        let g = copies[j];
        Copy {
            slot: (lo + j) as u32,
            gpu: g,
            domain: domains[g as usize],
            index: indices[g as usize],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::HardwareProfile;

    fn topo(gpus: u32) -> Topology {
        Topology::new(&HardwareProfile::builtin("h800").unwrap(), gpus).unwrap()
    }

    /// One token on GPU 0 choosing `experts`, 1 expert per GPU on 64 GPUs (8 nodes).
    fn one_token_plan(experts: &[u16], path: DispatchPath) -> TrafficPlan {
        let t = topo(64);
        let placement = ExpertPlacement::contiguous(64, 64).unwrap();
        let mut tokens = vec![0u32; 64];
        tokens[0] = 1;
        let routing = LayerRouting::new(experts.len(), &tokens, experts.to_vec()).unwrap();
        let ranges: Vec<(usize, usize)> = tokens.iter().map(|&n| (0, n as usize)).collect();
        TrafficPlan::build(&t, &placement, &routing, &ranges, path, "routing").unwrap()
    }

    #[test]
    fn forwarding_sends_one_nic_copy_per_target_node() {
        // Experts on GPUs 9, 10 (node 1), 17 (node 2), 3 (own node), 0 (own GPU).
        let plan = one_token_plan(&[9, 10, 17, 3, 0], DispatchPath::Forwarded);
        assert_eq!(plan.nic.total_units(), 2);
        // Node 1: forwarder 8 → 9, 10; node 2: forwarder 16 → 17; own node: 0 → 3.
        assert_eq!(plan.nvlink.total_units(), 4);
        assert_eq!(plan.pairs.iter().sum::<u32>(), 5);
        let direct = one_token_plan(&[9, 10, 17, 3, 0], DispatchPath::Direct);
        assert_eq!(direct.nic.total_units(), 4);
        assert!(direct.nvlink.is_empty());
    }

    #[test]
    fn both_groupings_sort_by_units_then_the_other_end_with_shared_latencies() {
        // 13 GPUs × 5 columns; column c of GPU s goes to GPU (3s + c) mod 13. Small units take
        // the counting sort, large ones the comparison sort.
        for scale in [3u32, 1_000_000] {
            let (n, cols) = (13usize, 5usize);
            let units: Vec<u32> = (0..(n * cols) as u32)
                .map(|i| ((i * 31) % 7) * scale)
                .collect();
            let dst = |s: u32, c: u32| (3 * s + c) % 13;
            // One flow into GPU 4 (from GPU 1, column 1) has another latency.
            let latency = |s: u32, d: u32| if (s, d) == (1, 4) { 2.0 } else { 1.0 };
            let set = FlowSet::from_matrix(
                n,
                Matrix {
                    units: &units,
                    cols,
                    dst,
                    flags: |i, s, d| (i % 2 == 1, usize::from(latency(s, d) == 2.0)),
                    latencies_us: vec![1.0, 2.0],
                },
            );
            let all: Vec<Flow> = (0..n * cols)
                .filter(|&i| units[i] > 0)
                .map(|i| {
                    let (s, c) = ((i / cols) as u32, (i % cols) as u32);
                    Flow {
                        src: s,
                        dst: dst(s, c),
                        units: units[i],
                        forwarded: i % 2 == 1,
                        latency_us: latency(s, dst(s, c)),
                    }
                })
                .collect();
            assert_eq!(set.len(), all.len());
            type Key = fn(&Flow) -> (u32, u32);
            let by_src: Key = |f| (f.src, f.dst);
            let by_dst: Key = |f| (f.dst, f.src);
            for (packed, offsets, shared, key) in [
                (&set.by_src, &set.src_offsets, &set.src_latency_us, by_src),
                (&set.by_dst, &set.dst_offsets, &set.dst_latency_us, by_dst),
            ] {
                for g in 0..n as u32 {
                    let mut want: Vec<&Flow> = all.iter().filter(|f| key(f).0 == g).collect();
                    want.sort_by_key(|f| (f.units, key(f).1));
                    let got =
                        &packed[offsets[g as usize] as usize..offsets[g as usize + 1] as usize];
                    assert_eq!(got.len(), want.len());
                    for (p, f) in got.iter().zip(&want) {
                        assert_eq!(
                            (p.units, p.rx, p.forwarded, set.latency_us(p)),
                            (f.units, key(f).1, f.forwarded, f.latency_us)
                        );
                    }
                    let lat: Vec<f64> = want.iter().map(|f| f.latency_us).collect();
                    match lat.first() {
                        Some(&l) if lat.iter().all(|&x| x == l) => {
                            assert_eq!(shared[g as usize], l)
                        }
                        _ => assert!(shared[g as usize].is_nan()),
                    }
                }
            }
        }
    }

    #[test]
    fn flows_are_grouped_by_endpoint_in_ascending_size() {
        let plan = one_token_plan(&[9, 17, 25], DispatchPath::Direct);
        let out =
            &plan.nic.by_src[plan.nic.src_offsets[0] as usize..plan.nic.src_offsets[1] as usize];
        assert_eq!(out.len(), 3);
        for w in out.windows(2) {
            assert!(w[0].units <= w[1].units);
        }
    }
}
