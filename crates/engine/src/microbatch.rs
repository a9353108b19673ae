//! Splitting a step's batch into two micro-batches of balanced work, for two-batch overlap (TBO).
//!
//! With TBO the compute of one micro-batch overlaps the dispatch/combine of the other, so the step
//! takes about twice the larger micro-batch's stage time: the split should make both halves equal.
//! An item's work is `attention_per_pair * attention_pairs + per_token * tokens`: core attention over
//! the latent cache grows with the query-key pairs (context length for one decode token), the
//! projections, gate, experts and communication grow with tokens.
//!
//! [`split_two`] is greedy longest-processing-time (LPT): items by decreasing work, each to the lighter
//! micro-batch. Guarantees (tested): deterministic (ties broken by index; same input, same split);
//! `|work[0] - work[1]|` is at most the largest single item's work; the larger half is within 7/6 of
//! the best possible split (Graham's LPT bound for two machines); with at least two items of positive
//! work both halves are non-empty.

use serde::{Deserialize, Serialize};

/// Relative cost weights of work items (any consistent unit; the default is FLOPs per layer at
/// DeepSeek-V3's shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkWeights {
    /// Cost of one query-key pair of core attention. Default 278,528 = absorbed MLA FLOPs per pair
    /// per layer: 128 heads x (576 + 512) x 2.
    pub attention_per_pair: u64,
    /// Cost of one token through the rest of a layer. Default 1,200,000,000 ~ 2 x 36.6 G activated
    /// GEMM parameters / 61 layers (deepseek-facts: ~73 GFLOP per decode token).
    pub per_token: u64,
}

impl Default for WorkWeights {
    fn default() -> Self {
        Self {
            attention_per_pair: 128 * (576 + 512) * 2,
            per_token: 1_200_000_000,
        }
    }
}

/// The size of one batch item (a decode sequence or a prefill chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkItem {
    /// Query tokens computed for it in this step.
    pub tokens: u64,
    /// Causal query-key pairs: the sum over its query tokens of the positions each attends to.
    pub attention_pairs: u64,
}

impl WorkItem {
    /// Item computing positions `start..end` causally: token at position `p` attends to `p + 1`
    /// positions.
    pub fn causal(start: u64, end: u64) -> Self {
        let end = end.max(start);
        // sum_{p=start}^{end-1} (p + 1) = (end(end+1) - start(start+1)) / 2
        let tri = |n: u64| n.saturating_mul(n.saturating_add(1)) / 2;
        Self {
            tokens: end - start,
            attention_pairs: tri(end) - tri(start),
        }
    }
}

impl WorkWeights {
    /// Work of one item (saturating).
    pub fn work(&self, item: &WorkItem) -> u64 {
        self.attention_per_pair
            .saturating_mul(item.attention_pairs)
            .saturating_add(self.per_token.saturating_mul(item.tokens))
    }
}

/// Assignment of items to micro-batch 0 or 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicroBatchSplit {
    /// Micro-batch (0 or 1) of each item, in input order.
    pub assignment: Vec<u8>,
    /// Total work of each micro-batch.
    pub work: [u64; 2],
}

/// Splits `items` into two micro-batches of balanced work (greedy LPT; see the module docs).
pub fn split_two(items: &[WorkItem], weights: &WorkWeights) -> MicroBatchSplit {
    let works: Vec<u64> = items.iter().map(|item| weights.work(item)).collect();
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| works[b].cmp(&works[a]).then(a.cmp(&b)));
    let mut assignment = vec![0u8; items.len()];
    let mut work = [0u64; 2];
    for i in order {
        let half = usize::from(work[1] < work[0]);
        assignment[i] = half as u8;
        work[half] = work[half].saturating_add(works[i]);
    }
    MicroBatchSplit { assignment, work }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNIT: WorkWeights = WorkWeights {
        attention_per_pair: 1,
        per_token: 10,
    };

    fn decode(context: u64) -> WorkItem {
        WorkItem::causal(context - 1, context)
    }

    #[test]
    fn causal_pairs_count_the_triangle() {
        assert_eq!(
            WorkItem::causal(0, 4),
            WorkItem {
                tokens: 4,
                attention_pairs: 1 + 2 + 3 + 4
            }
        );
        assert_eq!(WorkItem::causal(99, 100).attention_pairs, 100);
        assert_eq!(WorkItem::causal(5, 5).tokens, 0);
    }

    #[test]
    fn long_contexts_are_spread_over_both_halves() {
        // Two long and four short sequences: each half gets one long one.
        let items = [
            decode(4000),
            decode(10),
            decode(4000),
            decode(10),
            decode(10),
            decode(10),
        ];
        let split = split_two(&items, &UNIT);
        assert_ne!(split.assignment[0], split.assignment[2]);
        assert_eq!(split.work[0], split.work[1]);
    }

    #[test]
    fn split_is_deterministic_for_equal_items() {
        let items = vec![decode(100); 5];
        let a = split_two(&items, &UNIT);
        assert_eq!(a, split_two(&items, &UNIT));
        assert_eq!(a.assignment, vec![0, 1, 0, 1, 0]);
    }

    #[test]
    fn empty_and_single_batches_use_micro_batch_zero() {
        assert_eq!(split_two(&[], &UNIT).work, [0, 0]);
        let one = split_two(&[decode(5)], &UNIT);
        assert_eq!((one.assignment, one.work), (vec![0], [15, 0]));
    }

    /// Best possible larger half, by trying every subset.
    fn optimal_max(works: &[u64]) -> u64 {
        let total: u64 = works.iter().sum();
        (0u32..1 << works.len())
            .map(|mask| {
                let a: u64 = works
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, w)| w)
                    .sum();
                a.max(total - a)
            })
            .min()
            .unwrap_or(0)
    }

    proptest! {
        #[test]
        fn split_is_balanced_within_the_largest_item_and_lpt_bound(
            raw in proptest::collection::vec((1u64..3, 1u64..5000), 0..12),
        ) {
            let items: Vec<WorkItem> = raw
                .iter()
                .map(|&(tokens, ctx)| WorkItem::causal(ctx, ctx + tokens))
                .collect();
            let split = split_two(&items, &UNIT);
            let works: Vec<u64> = items.iter().map(|i| UNIT.work(i)).collect();
            let mut sums = [0u64; 2];
            for (i, &half) in split.assignment.iter().enumerate() {
                prop_assert!(half <= 1);
                sums[half as usize] += works[i];
            }
            prop_assert_eq!(sums, split.work);
            let largest = works.iter().copied().max().unwrap_or(0);
            prop_assert!(split.work[0].abs_diff(split.work[1]) <= largest);
            let opt = optimal_max(&works);
            prop_assert!(6 * split.work[0].max(split.work[1]) <= 7 * opt);
            if items.len() >= 2 {
                prop_assert!(split.assignment.contains(&0) && split.assignment.contains(&1));
            }
        }
    }
}
