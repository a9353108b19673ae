//! Dispatch and combine: moving real hidden rows between ranks, and running each rank's experts.
//!
//! One routed forward of one layer, for `n` token rows of `hidden` `[n, h]`:
//!
//! 1. **Plan** ([`plan_dispatch`], pure): for each token (in source-rank order, then row order)
//!    and each of its `top_k` experts, the replica is
//!    [`ExpertPlacement::select_replica`]`(expert, index of the token among its rank's tokens,
//!    source rank)`; the replica's rank receives the token's row once, with the list of (expert,
//!    weight) pairs it must apply. The plan records the dispatch matrix.
//! 2. **Dispatch**: each destination rank's receive buffer is assembled by copying the rows from
//!    the sources' memory (`Vec<f32>` row copies, source rank by source rank: the messages), then
//!    becomes one tensor on the device.
//! 3. **Expert compute**: each rank runs all its received pairs in one grouped call
//!    ([`ExpertBank::forward_pairs`]), giving one weighted sum per received row.
//! 4. **Combine**: each rank's rows go back to their source, which adds them into the token's
//!    output **in ascending rank order**. That order is fixed, so the result is bit-identical from
//!    run to run and independent of how ranks were spread over threads; it differs from a
//!    single-process sum only by float reassociation (well within 1e-5 in f32).
//!
//! Hidden rows travel through host memory (`to_vec`/`from_vec`): on the CPU device that is the
//! copy a transport makes anyway; on an accelerator it would bounce through the host.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use pdserve_model::{ExpertBank, ExpertPair, Routing};

use super::error::EpRuntimeError;
use super::traffic::LayerTraffic;
use crate::ExpertPlacement;

/// One rank's weighted output rows, row-major, or why it has none.
type RankOutput = Result<Vec<f32>, EpRuntimeError>;

/// Which rank each token row of a forward comes from, and its index among that rank's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenRanks {
    ranks: Vec<u32>,
    index_in_rank: Vec<u32>,
    /// Rows ordered by (rank, row).
    order: Vec<u32>,
}

impl TokenRanks {
    /// Validates `ranks[row] < num_ranks`.
    pub fn new(ranks: &[u32], num_ranks: usize) -> Result<Self, EpRuntimeError> {
        let mut seen = vec![0u32; num_ranks];
        let mut index_in_rank = Vec::with_capacity(ranks.len());
        for (row, &rank) in ranks.iter().enumerate() {
            let count = seen
                .get_mut(rank as usize)
                .ok_or(EpRuntimeError::RankOutOfRange {
                    row,
                    rank,
                    num_ranks,
                })?;
            index_in_rank.push(*count);
            *count += 1;
        }
        let mut order: Vec<u32> = (0..ranks.len() as u32).collect();
        order.sort_by_key(|&row| (ranks[row as usize], row));
        Ok(Self {
            ranks: ranks.to_vec(),
            index_in_rank,
            order,
        })
    }

    /// Rows covered.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }
}

/// What each destination rank receives in one layer's dispatch.
#[derive(Debug, Clone)]
pub(crate) struct DispatchPlan {
    /// `recv_rows[dst]`: the source rows `dst` receives, in receive order.
    recv_rows: Vec<Vec<u32>>,
    /// `pairs[dst]`: the (expert, weight) pairs `dst` applies; `row` and `out_row` index its
    /// receive buffer.
    pairs: Vec<Vec<ExpertPair>>,
    /// `recv_pair_counts[dst][i]`: pairs carried by received row `i`.
    recv_pair_counts: Vec<Vec<u32>>,
    /// The dispatch (and shared-expert) traffic of this forward; `combine` is filled by
    /// [`execute`] as the combine runs.
    pub traffic: LayerTraffic,
}

/// Plans one layer's dispatch (pure). `row_bytes` is one row's size at the real shape.
pub(crate) fn plan_dispatch(
    layer: usize,
    placement: &ExpertPlacement,
    routing: &Routing,
    tokens: &TokenRanks,
    row_bytes: u64,
) -> Result<DispatchPlan, EpRuntimeError> {
    let n = tokens.len();
    let k = routing.top_k;
    if k == 0 || routing.ids.len() != n * k || routing.weights.len() != n * k {
        return Err(EpRuntimeError::Input {
            layer,
            reason: format!(
                "routing holds {} ids and {} weights with top_k {k} for {n} token rows",
                routing.ids.len(),
                routing.weights.len()
            ),
        });
    }
    let d = placement.num_ranks();
    let per_rank = placement.experts_per_rank();
    let mut recv_rows: Vec<Vec<u32>> = vec![Vec::new(); d];
    let mut pairs: Vec<Vec<ExpertPair>> = vec![Vec::new(); d];
    let mut recv_pair_counts: Vec<Vec<u32>> = vec![Vec::new(); d];
    let mut traffic = LayerTraffic::new(layer, d, k, row_bytes);
    traffic.calls = 1;
    traffic.source_ranks = tokens.ranks.clone();
    traffic.served_ranks = vec![0; n * k];
    // `stamp[dst]` = the token whose row `dst` received last; `slot[dst]` its receive index.
    let mut stamp = vec![u32::MAX; d];
    let mut slot = vec![0u32; d];
    for &row in &tokens.order {
        let t = row as usize;
        let src = tokens.ranks[t] as usize;
        let index = tokens.index_in_rank[t] as usize;
        let ids = &routing.ids[t * k..(t + 1) * k];
        let weights = &routing.weights[t * k..(t + 1) * k];
        for (j, (&expert, &weight)) in ids.iter().zip(weights).enumerate() {
            let physical = placement.select_replica(expert as usize, index, src)?;
            let dst = physical / per_rank;
            traffic.served_ranks[t * k + j] = dst as u32;
            let new_row = stamp[dst] != row;
            if new_row {
                stamp[dst] = row;
                slot[dst] = recv_rows[dst].len() as u32;
                recv_rows[dst].push(row);
                recv_pair_counts[dst].push(0);
            }
            let i = slot[dst];
            pairs[dst].push(ExpertPair {
                row: i,
                expert,
                weight,
                out_row: i,
            });
            recv_pair_counts[dst][i as usize] += 1;
            traffic.dispatch.add(src, dst, u64::from(new_row), 1);
        }
        traffic
            .shared
            .add(src, placement.shared_expert_rank(src, index), 1, 1);
        traffic.tokens_per_rank[src] += 1;
        traffic.routing_by_rank[src].extend_from_slice(ids);
    }
    Ok(DispatchPlan {
        recv_rows,
        pairs,
        recv_pair_counts,
        traffic,
    })
}

/// Runs a planned forward: dispatch, per-rank grouped compute, combine. `tokens` are the rows'
/// source ranks the plan was made with; `banks[dst]` is rank `dst`'s bank of this layer;
/// `source` holds the `[n, h]` hidden rows (row-major) in the sources' memory. Returns the
/// combined `[n, h]` rows (row-major) and fills `plan.traffic.combine`.
pub(crate) fn execute(
    plan: &mut DispatchPlan,
    tokens: &TokenRanks,
    source: &[f32],
    hidden: usize,
    banks: &[&ExpertBank],
    device: &Device,
    threads: usize,
) -> Result<Vec<f32>, EpRuntimeError> {
    let d = plan.recv_rows.len();
    let active: Vec<usize> = (0..d).filter(|&r| !plan.recv_rows[r].is_empty()).collect();
    let run_rank = |dst: usize| -> RankOutput {
        let rows = &plan.recv_rows[dst];
        // Dispatch: the receive buffer, message by message (rows arrive grouped by source).
        let mut buffer = Vec::with_capacity(rows.len() * hidden);
        for &row in rows {
            let start = row as usize * hidden;
            buffer.extend_from_slice(&source[start..start + hidden]);
        }
        let received = Tensor::from_vec(buffer, (rows.len(), hidden), device)?;
        let out = banks[dst].forward_pairs(&received, &plan.pairs[dst], rows.len())?;
        Ok(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let mut outputs: Vec<Option<Vec<f32>>> = vec![None; d];
    if threads <= 1 || active.len() <= 1 {
        for &dst in &active {
            outputs[dst] = Some(run_rank(dst)?);
        }
    } else {
        let next = AtomicUsize::new(0);
        let workers = threads.min(active.len());
        let results: Vec<Vec<(usize, RankOutput)>> = std::thread::scope(|scope| {
            let work = || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&dst) = active.get(i) else { break };
                    done.push((dst, run_rank(dst)));
                }
                done
            };
            let handles: Vec<_> = (1..workers).map(|_| scope.spawn(work)).collect();
            let mut all = vec![work()];
            for h in handles {
                // A worker that panicked lost its ranks' results; they are reported below.
                all.push(h.join().unwrap_or_default());
            }
            all
        });
        for (dst, result) in results.into_iter().flatten() {
            outputs[dst] = Some(result?);
        }
    }
    // Combine: each rank sends its rows back; sources add them in ascending rank order.
    let n_tokens = tokens.len();
    let mut combined = vec![0f32; n_tokens * hidden];
    for (dst, (rows, out)) in plan.recv_rows.iter().zip(&outputs).enumerate() {
        if rows.is_empty() {
            continue;
        }
        let Some(out) = out.as_ref() else {
            return Err(EpRuntimeError::Input {
                layer: plan.traffic.layer,
                reason: format!("rank {dst}'s expert compute produced no result"),
            });
        };
        for (i, &row) in rows.iter().enumerate() {
            let t = row as usize;
            let src = tokens.ranks[t] as usize;
            let pairs = u64::from(plan.recv_pair_counts[dst][i]);
            plan.traffic.combine.add(dst, src, 1, pairs);
            let acc = &mut combined[t * hidden..(t + 1) * hidden];
            for (a, &v) in acc.iter_mut().zip(&out[i * hidden..(i + 1) * hidden]) {
                *a += v;
            }
        }
    }
    Ok(combined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlacementConfig;

    #[test]
    fn token_index_counts_rows_per_rank_in_row_order() {
        let t = TokenRanks::new(&[1, 0, 1, 1, 0], 2).unwrap();
        assert_eq!(t.index_in_rank, vec![0, 0, 1, 2, 1]);
        assert_eq!(
            t.order,
            vec![1, 4, 0, 2, 3],
            "rank 0's rows first, each in row order"
        );
        assert!(TokenRanks::new(&[0, 2], 2).is_err());
    }

    #[test]
    fn a_token_is_sent_once_per_rank_with_all_its_pairs_for_that_rank() {
        // 4 experts on 2 ranks: experts 0, 1 on rank 0; 2, 3 on rank 1.
        let placement = ExpertPlacement::from_config(&PlacementConfig {
            num_ranks: 2,
            num_logical_experts: 4,
            ..PlacementConfig::default()
        })
        .unwrap();
        // Row 0 (rank 1) picks experts 0, 1, 2; row 1 (rank 0) picks 3, 2, 1.
        let routing = Routing {
            top_k: 3,
            ids: vec![0, 1, 2, 3, 2, 1],
            weights: vec![0.5, 0.25, 0.25, 0.1, 0.2, 0.7],
        };
        let tokens = TokenRanks::new(&[1, 0], 2).unwrap();
        let plan = plan_dispatch(7, &placement, &routing, &tokens, 16).unwrap();
        // Rank 0 receives row 1 (its own, local) then row 0 (from rank 1): sources in order.
        assert_eq!(plan.recv_rows, vec![vec![1, 0], vec![1, 0]]);
        assert_eq!(plan.recv_pair_counts, vec![vec![1, 2], vec![2, 1]]);
        let experts0: Vec<(u32, u32)> = plan.pairs[0].iter().map(|p| (p.row, p.expert)).collect();
        assert_eq!(experts0, vec![(0, 1), (1, 0), (1, 1)]);
        let d = &plan.traffic.dispatch;
        assert_eq!(
            (d.rows(0, 0), d.pairs(0, 0)),
            (1, 1),
            "rank 0's own token: local"
        );
        assert_eq!(
            (d.rows(1, 0), d.pairs(1, 0)),
            (1, 2),
            "one row carries two pairs"
        );
        assert_eq!(d.total_pairs(), 6);
        assert_eq!(plan.traffic.tokens_per_rank, vec![1, 1]);
        assert_eq!(
            plan.traffic.routing_by_rank,
            vec![vec![3, 2, 1], vec![0, 1, 2]]
        );
        assert_eq!(
            plan.traffic.shared.local_rows(),
            2,
            "every rank runs its own shared expert"
        );
    }

    #[test]
    fn routing_of_the_wrong_size_is_an_error_naming_the_layer() {
        let placement = ExpertPlacement::contiguous(4, 2).unwrap();
        let routing = Routing {
            top_k: 2,
            ids: vec![0, 1, 2],
            weights: vec![1.0; 3],
        };
        let tokens = TokenRanks::new(&[0, 1], 2).unwrap();
        let err = plan_dispatch(3, &placement, &routing, &tokens, 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer 3") && err.contains("3 ids"), "{err}");
    }
}
