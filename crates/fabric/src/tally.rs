//! The hot loop of a traffic plan: one micro-batch's (token, expert) copies counted per link pair.
//!
//! [`count`] gives exactly the counts of the copy-by-copy rule in `plan.rs` (the module doc of
//! [`crate::plan`] states it), faster:
//! - The replica choice is a table lookup: per expert a slot base and a copy count whose `mod` is a
//!   mask for the usual one or two copies; experts whose choice is fixed for a source GPU
//!   (one copy, a copy on the source, a copy in the source's domain) are patched in per source and
//!   restored after it.
//! - For a fixed source, a token reaches each GPU at most once and each domain at most once,
//!   however many of its experts live there. The source's tokens go in chunks of up to 64; every
//!   copy sets its token's bit in its GPU's column word, so after the chunk a column's population
//!   count is the tokens that GPU receives (its NVLink hops, from the source inside its domain,
//!   from the forwarder elsewhere) and the union of a domain's columns gives the tokens that cross
//!   the NIC to it. Flushing a column is a few vector operations, not a per-copy branch. Beyond
//!   64 domains (or with a `key mod 3` replica choice) a pairwise comparison within the token
//!   deduplicates instead. Hops that need no NVLink (to the sender itself: the source, or the
//!   forwarder) are dropped.
//! - Everything is indexed by dense ids; no maps, no per-copy allocation.
//!
//! It declines (returns `None`) where the reference rule must run: routings that name serving GPUs,
//! unknown expert ids (the reference reports them with their token), keys or token counts past 32
//! bits.
//!
//! Invariant: for every input it accepts, the [`Counts`] are identical to the reference's
//! (property-tested against it).

use crate::plan::{Counts, ExpertTable};
use crate::routing::{LayerRouting, MAX_TOP_K};
use crate::topology::Topology;

/// How expert `e` picks its slot for the current source: `base + key mod copies`, a mask when
/// `copies` is a power of two (one copy: mask 0), a division otherwise (rare: three copies).
#[derive(Debug, Clone, Copy)]
struct Choice {
    base: u32,
    /// `copies − 1` when `copies` is a power of two, else [`Choice::DIVIDE`].
    mask: u32,
    copies: u32,
}

impl Choice {
    const DIVIDE: u32 = u32::MAX;

    fn new(base: u32, copies: u32) -> Self {
        let copies = copies.max(1);
        Self {
            base,
            mask: if copies.is_power_of_two() {
                copies - 1
            } else {
                Self::DIVIDE
            },
            copies,
        }
    }

    fn fixed(slot: u32) -> Self {
        Self::new(slot, 1)
    }

    #[inline(always)]
    fn slot(self, key: u32) -> usize {
        let j = if self.mask != Self::DIVIDE {
            key & self.mask
        } else {
            key % self.copies
        };
        (self.base + j) as usize
    }
}

/// A slot's GPU as the loop needs it.
#[derive(Debug, Clone, Copy)]
struct SlotInfo {
    gpu: u32,
    domain: u32,
    index: u32,
}

/// The choices of the experts with several copies, per source domain and per source GPU.
#[derive(Debug)]
struct Patches {
    /// `(expert, slot)` of the first copy in domain `d`: `by_domain[domain_off[d]..domain_off[d+1]]`.
    by_domain: Vec<(u32, u32)>,
    domain_off: Vec<usize>,
    /// `(expert, slot)` of the copy on GPU `g`.
    by_gpu: Vec<(u32, u32)>,
    gpu_off: Vec<usize>,
}

fn group_pairs(keys: usize, pairs: &[(usize, u32, u32)]) -> (Vec<(u32, u32)>, Vec<usize>) {
    let mut off = vec![0usize; keys + 1];
    for &(k, _, _) in pairs {
        off[k + 1] += 1;
    }
    for k in 0..keys {
        off[k + 1] += off[k];
    }
    let mut fill = off.clone();
    let mut out = vec![(0u32, 0u32); pairs.len()];
    for &(k, e, slot) in pairs {
        out[fill[k]] = (e, slot);
        fill[k] += 1;
    }
    (out, off)
}

impl Patches {
    fn new(experts: &ExpertTable, dom: &[u32], n: usize, domains: usize) -> Self {
        let mut per_domain = Vec::new();
        let mut per_gpu = Vec::new();
        for e in 0..experts.single.len() {
            let (lo, hi) = (experts.base[e], experts.base[e + 1]);
            if hi - lo < 2 {
                continue;
            }
            for (j, &g) in experts.slot_gpu[lo..hi].iter().enumerate() {
                let slot = (lo + j) as u32;
                let d = dom[g as usize];
                let first_in_domain = !experts.slot_gpu[lo..lo + j]
                    .iter()
                    .any(|&h| dom[h as usize] == d);
                if first_in_domain {
                    per_domain.push((d as usize, e as u32, slot));
                }
                let first_on_gpu = !experts.slot_gpu[lo..lo + j].contains(&g);
                if first_on_gpu {
                    per_gpu.push((g as usize, e as u32, slot));
                }
            }
        }
        let (by_domain, domain_off) = group_pairs(domains, &per_domain);
        let (by_gpu, gpu_off) = group_pairs(n, &per_gpu);
        Self {
            by_domain,
            domain_off,
            by_gpu,
            gpu_off,
        }
    }

    /// The patches for a source on GPU `src` in domain `d`: domain first, the GPU's own last (it
    /// wins).
    fn for_source(&self, src: usize, d: usize) -> impl Iterator<Item = &(u32, u32)> {
        self.by_domain[self.domain_off[d]..self.domain_off[d + 1]]
            .iter()
            .chain(&self.by_gpu[self.gpu_off[src]..self.gpu_off[src + 1]])
    }
}

/// The counts of one micro-batch's copies (`ranges[r]` of each rank `r`), or `None` where the
/// reference rule must run (see the module doc).
pub(crate) fn count(
    topology: &Topology,
    experts: &ExpertTable,
    routing: &LayerRouting,
    ranges: &[(usize, usize)],
    direct: bool,
) -> Option<Counts> {
    let n = topology.num_gpus() as usize;
    let top_k = routing.top_k();
    let n_experts = experts.single.len();
    if top_k == 0 || top_k > MAX_TOP_K {
        return None;
    }
    // Tokens are stamped with a 32-bit counter that must not wrap within the plan.
    let total_tokens: usize = ranges
        .iter()
        .take(n)
        .map(|&(lo, hi)| hi.saturating_sub(lo))
        .sum();
    if total_tokens >= u32::MAX as usize {
        return None;
    }
    for (src, &(lo, hi)) in ranges.iter().enumerate().take(n) {
        if routing.gpus_of(src, lo..hi).is_some() {
            return None;
        }
        // The replica key `token + source + expert` must fit 32 bits.
        if hi.checked_add(src)?.checked_add(n_experts)? > u32::MAX as usize {
            return None;
        }
    }
    let dom = topology.domains();
    let idx = topology.indices_in_domain();
    let domains = topology.num_domains() as usize;
    let dg = topology.domain_gpus() as usize;
    let mut choice: Vec<Choice> = (0..n_experts)
        .map(|e| {
            let (lo, hi) = (experts.base[e], experts.base[e + 1]);
            Choice::new(lo as u32, (hi - lo) as u32)
        })
        .collect();
    let default = choice.clone();
    let info: Vec<SlotInfo> = experts
        .slot_gpu
        .iter()
        .map(|&g| SlotInfo {
            gpu: g,
            domain: dom[g as usize],
            index: idx[g as usize],
        })
        .collect();
    let patches = Patches::new(experts, dom, n, domains);
    let nic_cols = if direct { n } else { domains };
    let mut c = Counts {
        nic: vec![0u32; n * nic_cols],
        nic_cols,
        nvl: vec![0u32; n * dg],
        nvl_fwd: vec![0u32; n * dg],
        hits: vec![0u32; experts.slot_gpu.len()],
        tokens: vec![0u32; n],
        copies_out: vec![0u32; n],
    };
    // The pairwise loop's NVLink cells (sender × receiver index): the source's own hops, then
    // forwarders' hops.
    let mut own = Vec::new();
    let mut fwd = Vec::new();
    // The column loop (see `forwarded_lean`): token bits per GPU, and per slot its copies | GPU
    // << 32 | domain << 48. It needs domains ≤ 64, GPU ids below 2^16 and no division in the
    // replica choice; the pairwise loop takes the rest.
    let lean = !direct
        && domains <= 64
        && n <= 1 << 16
        && total_tokens * top_k < u32::MAX as usize
        && choice.iter().all(|c| c.mask != Choice::DIVIDE);
    let mut cols = vec![0u64; if lean { n } else { 0 }];
    let mut slots: Vec<u64> = if lean {
        info.iter()
            .map(|i| u64::from(i.gpu) << 32 | u64::from(i.domain) << 48)
            .collect()
    } else {
        Vec::new()
    };
    if !direct && !lean {
        own = vec![0u32; n * dg];
        fwd = vec![0u32; n * dg];
    }
    for (src, &(lo, hi)) in ranges.iter().enumerate().take(n) {
        c.tokens[src] = (hi - lo) as u32;
        c.copies_out[src] = ((hi - lo) * top_k) as u32;
        let s_domain = dom[src] as usize;
        for &(e, slot) in patches.for_source(src, s_domain) {
            choice[e as usize] = Choice::fixed(slot);
        }
        let ids = routing.experts_of(src, lo..hi);
        let source = Source {
            src,
            lo,
            domain: dom[src],
            index: idx[src] as usize,
        };
        let known = if direct {
            direct_source(&source, ids, top_k, &choice, &info, &mut c, n)
        } else if lean && top_k == 8 {
            forwarded_lean::<8>(&source, ids, 8, &choice, &mut slots, &mut c, &mut cols, dg)
        } else if lean {
            forwarded_lean::<0>(
                &source, ids, top_k, &choice, &mut slots, &mut c, &mut cols, dg,
            )
        } else {
            forwarded_source(
                &source, ids, top_k, &choice, &info, &mut c, &mut own, &mut fwd, dg,
            )
        };
        if !known {
            return None;
        }
        for &(e, _) in patches.for_source(src, s_domain) {
            choice[e as usize] = default[e as usize];
        }
    }
    for (hits, &slot) in c.hits.iter_mut().zip(&slots) {
        *hits = slot as u32;
    }
    if lean {
        for (cell, &f) in c.nvl.iter_mut().zip(&c.nvl_fwd) {
            *cell += f;
        }
    }
    if !direct && !lean {
        for (from, &index) in idx.iter().enumerate().take(n) {
            let diagonal = from * dg + index as usize;
            own[diagonal] = 0;
            fwd[diagonal] = 0;
        }
        for (cell, (o, f)) in own.iter().zip(&fwd).enumerate() {
            c.nvl[cell] = o + f;
            c.nvl_fwd[cell] = *f;
        }
    }
    Some(c)
}

/// One source GPU's place in the topology.
struct Source {
    src: usize,
    lo: usize,
    domain: u32,
    index: usize,
}

fn direct_source(
    s: &Source,
    ids: &[u16],
    top_k: usize,
    choice: &[Choice],
    info: &[SlotInfo],
    c: &mut Counts,
    n: usize,
) -> bool {
    let row = s.src * n;
    for (t, chosen) in ids.chunks_exact(top_k).enumerate() {
        let key = (s.lo + t + s.src) as u32;
        for &e in chosen {
            let Some(ch) = choice.get(usize::from(e)) else {
                return false;
            };
            let slot = ch.slot(key + u32::from(e));
            c.hits[slot] += 1;
            let g = info[slot].gpu as usize;
            c.nic[row + g] += u32::from(g != s.src);
        }
    }
    true
}

/// Counts one source's tokens on the forwarded path, deduplicating by pairwise comparison (any
/// number of domains); false at an unknown expert id.
#[allow(clippy::too_many_arguments)]
fn forwarded_source(
    s: &Source,
    ids: &[u16],
    top_k: usize,
    choice: &[Choice],
    info: &[SlotInfo],
    c: &mut Counts,
    own: &mut [u32],
    fwd: &mut [u32],
    dg: usize,
) -> bool {
    let k = top_k;
    let nic_row = s.src * c.nic_cols;
    let fwd_col = s.index;
    let mut cells = [0usize; MAX_TOP_K];
    let mut local = [false; MAX_TOP_K];
    let mut doms = [0u32; MAX_TOP_K];
    for (t, chosen) in ids.chunks_exact(k).enumerate() {
        let key = (s.lo + t + s.src) as u32;
        for j in 0..k {
            let e = chosen[j];
            let Some(ch) = choice.get(usize::from(e)) else {
                return false;
            };
            let slot = ch.slot(key + u32::from(e));
            c.hits[slot] += 1;
            let i = info[slot];
            let is_local = i.domain == s.domain;
            // Same domain: the source sends over NVLink; else the forwarder (the GPU of the
            // source's index in that domain) does.
            let from = if is_local {
                s.src
            } else {
                i.domain as usize * dg + fwd_col
            };
            cells[j] = from * dg + i.index as usize;
            local[j] = is_local;
            doms[j] = i.domain;
        }
        for j in 0..k {
            let cell = cells[j];
            let d = doms[j];
            let mut new_cell = true;
            let mut new_domain = d != s.domain;
            for i in 0..j {
                new_cell &= cells[i] != cell;
                new_domain &= doms[i] != d;
            }
            c.nic[nic_row + d as usize] += u32::from(new_domain);
            let target = if local[j] { &mut *own } else { &mut *fwd };
            target[cell] += u32::from(new_cell);
        }
    }
    true
}

/// Counts one source's tokens on the forwarded path with at most 64 domains. Tokens go in chunks
/// of up to 64: each copy sets its token's bit in its GPU's column (`cols[gpu]`), so a token
/// counts once per GPU however many of its experts the GPU serves, and once per domain in the
/// union of the domain's columns. `K` is `top_k` when known at compile time (8: DeepSeek-V3),
/// else 0. False at an unknown expert id.
///
/// `slots[slot]` = copies | GPU << 32 | domain << 48 (copies counted here); every replica choice
/// is a mask; `cols` (one word per GPU) is all zero on entry and exit.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forwarded_lean<const K: usize>(
    s: &Source,
    ids: &[u16],
    top_k: usize,
    choice: &[Choice],
    slots: &mut [u64],
    c: &mut Counts,
    cols: &mut [u64],
    dg: usize,
) -> bool {
    let k = if K > 0 { K } else { top_k };
    let domains = cols.len() / dg;
    for (chunk, tokens) in ids.chunks(64 * k).enumerate() {
        let first = (s.lo + s.src + 64 * chunk) as u32;
        // A chunk with as many copies as GPUs touches most domains: flush them all rather than
        // track which.
        let dense = tokens.len() >= cols.len();
        let seen = if dense {
            mark::<K, false>(tokens, k, first, choice, slots, cols)
        } else {
            mark::<K, true>(tokens, k, first, choice, slots, cols)
        };
        let Some(mut seen) = seen else {
            return false;
        };
        if dense {
            seen = if domains == 64 {
                u64::MAX
            } else {
                (1u64 << domains) - 1
            };
        }
        while seen != 0 {
            let d = seen.trailing_zeros() as usize;
            seen &= seen - 1;
            flush_domain(s, d, c, &mut cols[d * dg..(d + 1) * dg], dg);
        }
    }
    true
}

/// The per-copy loop of [`forwarded_lean`] for one chunk of up to 64 tokens (the first with
/// replica key `first`): counts each copy on its slot, sets the token's bit in its GPU's column,
/// and returns the domains touched (a bit each; 0 unless `SEEN`); `None` at an unknown expert.
/// Kept out of line so that its few values stay in registers.
#[inline(never)]
fn mark<const K: usize, const SEEN: bool>(
    tokens: &[u16],
    k: usize,
    first: u32,
    choice: &[Choice],
    slots: &mut [u64],
    cols: &mut [u64],
) -> Option<u64> {
    let k = if K > 0 { K } else { k };
    let mut seen = 0u64;
    for (t, chosen) in tokens.chunks_exact(k).enumerate() {
        let key = first + t as u32;
        let bit = 1u64 << t;
        for &e in &chosen[..k] {
            let ch = choice.get(usize::from(e))?;
            let v = slots.get_mut((ch.base + ((key + u32::from(e)) & ch.mask)) as usize)?;
            *v += 1;
            let p = *v;
            *cols.get_mut(((p >> 32) & 0xffff) as usize)? |= bit;
            if SEEN {
                seen |= 1u64 << (p >> 48);
            }
        }
    }
    Some(seen)
}

/// Adds one chunk's columns of domain `d` to the counts and clears them: a GPU's tokens are its
/// NVLink hops (from the source in its own domain, else from the forwarder; none to the hop's own
/// sender), the union over the domain's GPUs its NIC copies (none inside the source's domain).
/// Hops go to `c.nvl` from the source and to `c.nvl_fwd` from a forwarder; the caller adds the
/// forwarded ones to `c.nvl` at the end.
#[inline(always)]
fn flush_domain(s: &Source, d: usize, c: &mut Counts, cols: &mut [u64], dg: usize) {
    let local = d == s.domain as usize;
    // The sender of this domain's hops; it has the source's index, the one receiver it skips.
    let from = if local { s.src } else { d * dg + s.index };
    let cells = if local { &mut c.nvl } else { &mut c.nvl_fwd };
    let row = &mut cells[from * dg..(from + 1) * dg];
    let own = cols[s.index].count_ones();
    let mut union = 0u64;
    // A plain loop over the domain's columns (vectorized).
    for (cell, col) in row.iter_mut().zip(cols.iter_mut()) {
        *cell += col.count_ones();
        union |= *col;
        *col = 0;
    }
    row[s.index] -= own;
    if !local {
        c.nic[s.src * c.nic_cols + d] += union.count_ones();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ExpertPlacement;
    use crate::plan::reference_counts;
    use crate::profile::HardwareProfile;
    use crate::synthetic::{RoutingKind, SyntheticRouting};
    use proptest::prelude::*;

    /// The fast counts and the reference's, for one random micro-batch.
    fn both(
        (hardware, gpus, top_k): (&str, u32, usize),
        redundant: u32,
        triple: bool,
        seed: u64,
        direct: bool,
        max_tokens: u32,
    ) -> (Option<Counts>, Counts) {
        let topo = Topology::new(&HardwareProfile::builtin(hardware).unwrap(), gpus).unwrap();
        let kind = if seed.is_multiple_of(2) {
            RoutingKind::Uniform
        } else {
            RoutingKind::NodeLimited
        };
        let router = SyntheticRouting::new(256, top_k, 8, 4, kind).unwrap();
        let per_rank: Vec<u32> = (0..gpus)
            .map(|g| 1 + ((g + seed as u32) * 37) % max_tokens)
            .collect();
        let routing = router.generate(&per_rank, seed, 0).unwrap();
        let mut placement = ExpertPlacement::contiguous(256, gpus)
            .unwrap()
            .with_redundant(redundant, None)
            .unwrap();
        if triple {
            // Expert 5 on three GPUs: the `key mod 3` division path.
            let mut replicas: Vec<Vec<u32>> =
                (0..256).map(|e| placement.gpus_of(e).to_vec()).collect();
            replicas[5] = vec![0, gpus / 2, gpus - 1];
            placement = ExpertPlacement::new(gpus, replicas).unwrap();
        }
        let ranges: Vec<(usize, usize)> = per_rank
            .iter()
            .map(|&t| ((seed as usize) % 2, t as usize))
            .collect();
        let experts = ExpertTable::new(&placement, topo.domains(), topo.indices_in_domain());
        let fast = count(&topo, &experts, &routing, &ranges, direct);
        let reference = reference_counts(&topo, &experts, &routing, &ranges, direct, "r").unwrap();
        (fast, reference)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn fast_counts_equal_the_reference_rule(
            seed in 0u64..10_000,
            shape in 0usize..5,
            redundant in 0u32..40,
            triple in any::<bool>(),
            direct in any::<bool>(),
        ) {
            // H800 at 16 and 144 GPUs, GB200 NVL72 (72-GPU domains), top-6 and top-8.
            let (hardware, gpus, top_k) = [
                ("h800", 16, 8),
                ("h800", 144, 8),
                ("h800", 64, 6),
                ("gb200-nvl72", 144, 8),
                ("h800", 8, 8),
            ][shape];
            let (fast, reference) = both((hardware, gpus, top_k), redundant, triple, seed, direct, 7);
            prop_assert_eq!(fast, Some(reference));
        }
    }

    #[test]
    fn more_than_64_domains_use_pairwise_deduplication_with_the_same_counts() {
        // 576 GPUs = 72 H800 nodes.
        let (fast, reference) = both(("h800", 576, 8), 32, true, 3, false, 7);
        assert_eq!(fast, Some(reference));
    }

    #[test]
    fn sources_with_more_than_one_chunk_of_tokens_count_like_the_reference() {
        // Up to 200 tokens per GPU: several 64-token chunks per source, on both paths.
        for (seed, direct) in [(4, false), (5, false), (6, true)] {
            let (fast, reference) = both(("h800", 32, 8), 8, false, seed, direct, 200);
            assert_eq!(fast, Some(reference));
        }
    }

    #[test]
    fn routings_with_serving_gpus_or_unknown_experts_are_left_to_the_reference() {
        let topo = Topology::new(&HardwareProfile::builtin("h800").unwrap(), 8).unwrap();
        let placement = ExpertPlacement::contiguous(8, 8).unwrap();
        let experts = ExpertTable::new(&placement, topo.domains(), topo.indices_in_domain());
        let tokens = [1u32; 8];
        let ranges: Vec<(usize, usize)> = tokens.iter().map(|&t| (0, t as usize)).collect();
        let routing = LayerRouting::new(1, &tokens, vec![0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert!(count(&topo, &experts, &routing, &ranges, false).is_some());
        let with_gpus = routing.clone().with_gpus(vec![0; 8]).unwrap();
        assert!(count(&topo, &experts, &with_gpus, &ranges, false).is_none());
        let unknown = LayerRouting::new(1, &tokens, vec![0, 1, 2, 3, 4, 5, 6, 9]).unwrap();
        assert!(count(&topo, &experts, &unknown, &ranges, false).is_none());
    }
}
