//! The two greedy primitives of EPLB: replicate hot experts, pack items into equal-count bins.
//!
//! Both are deterministic: ties are broken by the lowest index.

use crate::EpError;

/// Gives `num_physical - weights.len()` extra replicas, one at a time, to the item whose load per
/// replica (`weight / replicas`) is currently the largest.
///
/// Returns `(physical_to_item, replica_counts)`: physical slot `i < weights.len()` holds item `i`,
/// later slots hold the replicas in the order they were added.
///
/// This greedy minimizes the maximum per-replica load `max_i weight_i / count_i` over all count
/// vectors with `count_i >= 1` summing to `num_physical`: each step lowers the current maximum
/// only if it splits the item that attains it, and splitting any other item cannot lower it.
pub fn replicate(
    weights: &[f64],
    num_physical: usize,
) -> Result<(Vec<usize>, Vec<usize>), EpError> {
    if num_physical < weights.len() {
        return Err(EpError::field(
            "num_physical_experts",
            format!(
                "{num_physical} physical slots cannot hold {} logical experts",
                weights.len()
            ),
        ));
    }
    let mut physical_to_item: Vec<usize> = (0..weights.len()).collect();
    let mut counts = vec![1_usize; weights.len()];
    for _ in weights.len()..num_physical {
        let mut best = 0;
        for i in 1..weights.len() {
            // w_i / c_i > w_best / c_best, without division.
            if weights[i] * counts[best] as f64 > weights[best] * counts[i] as f64 {
                best = i;
            }
        }
        physical_to_item.push(best);
        counts[best] += 1;
    }
    Ok((physical_to_item, counts))
}

/// Packs `weights.len()` items into `num_packs` bins of exactly `weights.len() / num_packs` items
/// each, keeping bin weights close: items in descending weight go, one by one, to the lightest
/// bin that is not yet full.
///
/// Returns `(bin, position in bin)` per item. With one item per bin every assignment has the same
/// maximum, so item `i` goes to bin `i`.
///
/// A heuristic: it is not optimal (weights `[3, 3, 2, 2, 2, 0]` in 2 bins of 3 give 7 and 5, while
/// `{3, 3, 0}`, `{2, 2, 2}` gives 6 and 6).
pub fn pack_balanced(weights: &[f64], num_packs: usize) -> Result<Vec<(usize, usize)>, EpError> {
    if num_packs == 0 || !weights.len().is_multiple_of(num_packs) {
        return Err(EpError::field(
            "num_packs",
            format!(
                "{} items do not split evenly into {num_packs} packs",
                weights.len()
            ),
        ));
    }
    let per_pack = weights.len() / num_packs;
    if per_pack == 1 {
        return Ok((0..weights.len()).map(|i| (i, 0)).collect());
    }
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Stable sort: equal weights keep ascending index order.
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut pack_weight = vec![0.0_f64; num_packs];
    let mut pack_items = vec![0_usize; num_packs];
    let mut result = vec![(0, 0); weights.len()];
    for item in order {
        let mut best: Option<usize> = None;
        for pack in 0..num_packs {
            if pack_items[pack] < per_pack
                && best.is_none_or(|b| pack_weight[pack] < pack_weight[b])
            {
                best = Some(pack);
            }
        }
        // There is always a non-full pack: items placed so far < num_packs × per_pack.
        let pack = best.ok_or_else(|| EpError::field("num_packs", "ran out of pack capacity"))?;
        result[item] = (pack, pack_items[pack]);
        pack_weight[pack] += weights[item];
        pack_items[pack] += 1;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_goes_to_the_largest_load_per_replica() {
        // Loads 90, 30, 60 with 2 extra slots: first to 90 (→45 each), then to 60 (→30 each).
        let (map, counts) = replicate(&[90.0, 30.0, 60.0], 5).unwrap();
        assert_eq!(map, vec![0, 1, 2, 0, 2]);
        assert_eq!(counts, vec![2, 1, 2]);
    }

    #[test]
    fn replication_matches_brute_force_minimax() {
        // Every count vector of 3 items summing to 7, against the greedy's maximum.
        let weights = [7.0, 5.0, 1.0];
        let (_, counts) = replicate(&weights, 7).unwrap();
        let greedy = (0..3)
            .map(|i| weights[i] / counts[i] as f64)
            .fold(0.0, f64::max);
        let mut best = f64::INFINITY;
        for a in 1..=5 {
            for b in 1..=(6 - a) {
                let c = 7 - a - b;
                let m = (weights[0] / a as f64)
                    .max(weights[1] / b as f64)
                    .max(weights[2] / c as f64);
                best = best.min(m);
            }
        }
        assert_eq!(greedy, best);
    }

    #[test]
    fn fewer_slots_than_experts_is_an_error() {
        let err = replicate(&[1.0, 2.0], 1).unwrap_err();
        assert!(err.to_string().contains("num_physical_experts"), "{err}");
    }

    #[test]
    fn packing_fills_every_pack_exactly() {
        let weights = [5.0, 1.0, 4.0, 2.0, 3.0, 3.0, 0.0, 8.0];
        let packs = pack_balanced(&weights, 4).unwrap();
        let mut items = [0; 4];
        let mut load = [0.0; 4];
        for (i, &(p, pos)) in packs.iter().enumerate() {
            assert!(pos < 2);
            items[p] += 1;
            load[p] += weights[i];
        }
        assert_eq!(items, [2; 4]);
        // 8 | 5 | 4 | 3 then 3→pack of 3, 2→4, 1→5, 0→8: 8, 6, 6, 6.
        assert_eq!(load, [8.0, 6.0, 6.0, 6.0]);
    }

    #[test]
    fn packing_is_a_heuristic_that_can_miss_the_optimum() {
        let weights = [3.0, 3.0, 2.0, 2.0, 2.0, 0.0];
        let packs = pack_balanced(&weights, 2).unwrap();
        let mut load = [0.0; 2];
        for (i, &(p, _)) in packs.iter().enumerate() {
            load[p] += weights[i];
        }
        assert_eq!(load, [7.0, 5.0], "optimal is 6/6: {{3,3,0}} {{2,2,2}}");
    }

    #[test]
    fn one_item_per_pack_keeps_item_order() {
        let packs = pack_balanced(&[1.0, 9.0, 3.0], 3).unwrap();
        assert_eq!(packs, vec![(0, 0), (1, 0), (2, 0)]);
    }

    #[test]
    fn uneven_packing_is_an_error_naming_num_packs() {
        let err = pack_balanced(&[1.0; 5], 2).unwrap_err();
        assert!(err.to_string().contains("num_packs"), "{err}");
    }
}
