//! Properties of EPLB and placements on random loads and shapes.
//!
//! The runs use a fixed proptest seed so CI sees the same cases every time.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use pdserve_ep::eplb::{EplbParams, EplbPolicy, rebalance_layer, replicate};
use pdserve_ep::{Balance, ExpertPlacement, PlacementConfig};

/// A valid EP shape and a load for it.
#[derive(Debug, Clone)]
struct Case {
    nodes: usize,
    gpus_per_node: usize,
    groups: usize,
    num_logical: usize,
    num_physical: usize,
    load: Vec<f64>,
}

impl Case {
    fn gpus(&self) -> usize {
        self.nodes * self.gpus_per_node
    }

    fn params(&self) -> EplbParams {
        EplbParams {
            num_physical_experts: self.num_physical,
            num_groups: self.groups,
            num_nodes: self.nodes,
            num_gpus: self.gpus(),
        }
    }

    fn config(&self) -> PlacementConfig {
        PlacementConfig {
            num_ranks: self.gpus(),
            gpus_per_node: self.gpus_per_node,
            num_logical_experts: self.num_logical,
            num_redundant_experts: self.num_physical - self.num_logical,
            ..PlacementConfig::default()
        }
    }
}

fn load_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        0.0..10.0_f64,
        0.0..1000.0_f64,
        // Heavy tail: a few very hot experts.
        (1.0..100.0_f64).prop_map(|x| x * x * x),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![1_usize, 2, 4]),
        prop::sample::select(vec![1_usize, 2, 4]),
        1_usize..=2,
        1_usize..=4,
        0_usize..=2,
    )
        .prop_flat_map(
            |(nodes, gpus_per_node, groups_per_node, group_size, extra)| {
                let groups = nodes * groups_per_node;
                let num_logical = groups * group_size;
                let gpus = nodes * gpus_per_node;
                let num_physical = gpus * (num_logical.div_ceil(gpus) + extra);
                prop::collection::vec(load_value(), num_logical).prop_map(move |load| Case {
                    nodes,
                    gpus_per_node,
                    groups,
                    num_logical,
                    num_physical,
                    load,
                })
            },
        )
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_e91b),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Every expert has a replica, every GPU has exactly `slots / GPUs` slots (checked by
    /// `from_eplb`), total load is conserved, and the plan is a pure function of its input.
    #[test]
    fn plans_are_valid_and_conserve_load(case in case()) {
        for policy in [EplbPolicy::Hierarchical, EplbPolicy::Global] {
            let plan = rebalance_layer(&case.load, &case.params(), policy).unwrap();
            prop_assert_eq!(&plan, &rebalance_layer(&case.load, &case.params(), policy).unwrap());
            prop_assert!(plan.replica_counts.iter().all(|&c| c >= 1));
            prop_assert_eq!(plan.replica_counts.iter().sum::<usize>(), case.num_physical);
            let placement = ExpertPlacement::from_eplb(&case.config(), &plan).unwrap();
            let ranks = placement.expected_rank_loads(&case.load).unwrap();
            let total: f64 = case.load.iter().sum();
            prop_assert!((ranks.iter().sum::<f64>() - total).abs() <= 1e-9 * total.max(1.0));
        }
    }

    /// Hierarchical: all replicas of an expert, and all experts of a group, sit in one node, and
    /// each node holds `groups / nodes` groups.
    #[test]
    fn hierarchical_keeps_groups_node_local(case in case()) {
        let plan = rebalance_layer(&case.load, &case.params(), EplbPolicy::Hierarchical).unwrap();
        let slots_per_node = case.num_physical / case.nodes;
        let group_size = case.num_logical / case.groups;
        let mut node_of_group = vec![None; case.groups];
        let mut groups_on_node = vec![0; case.nodes];
        for (expert, replicas) in plan.logical_to_physical.iter().enumerate() {
            let node = replicas[0] / slots_per_node;
            prop_assert!(replicas.iter().all(|p| p / slots_per_node == node));
            let group = expert / group_size;
            match node_of_group[group] {
                None => {
                    node_of_group[group] = Some(node);
                    groups_on_node[node] += 1;
                }
                Some(n) => prop_assert_eq!(n, node),
            }
        }
        prop_assert!(groups_on_node.iter().all(|&g| g == case.groups / case.nodes));
    }

    /// Global: the busiest GPU exceeds the mean by less than one replica's load
    /// (`max ≤ mean + (1 − 1/GPUs) × max replica load`). This bound of greedy equal-count packing
    /// is observed (here and in a 300k-case offline search), not proven.
    #[test]
    fn global_max_gpu_load_is_within_one_replica_of_the_mean(case in case()) {
        let plan = rebalance_layer(&case.load, &case.params(), EplbPolicy::Global).unwrap();
        let placement = ExpertPlacement::from_eplb(&case.config(), &plan).unwrap();
        let b = Balance::of(&placement.expected_rank_loads(&case.load).unwrap());
        let max_replica = (0..case.num_logical)
            .map(|e| case.load[e] / plan.replica_counts[e] as f64)
            .fold(0.0, f64::max);
        let gpus = case.gpus() as f64;
        let bound = b.mean + (1.0 - 1.0 / gpus) * max_replica;
        prop_assert!(b.max <= bound * (1.0 + 1e-9) + 1e-9, "{} > {}", b.max, bound);
    }

    /// The replication step minimizes the maximum load per replica (brute force over all count
    /// vectors).
    #[test]
    fn replication_is_minimax_optimal(
        weights in prop::collection::vec(0.0..100.0_f64, 1..=4),
        extra in 0_usize..=4,
    ) {
        let n = weights.len();
        let (_, counts) = replicate(&weights, n + extra).unwrap();
        let max_of = |c: &[usize]| (0..n).map(|i| weights[i] / c[i] as f64).fold(0.0, f64::max);
        let greedy = max_of(&counts);
        let mut best = f64::INFINITY;
        let mut c = vec![1; n];
        enumerate(&mut c, 0, extra, &mut |c| best = best.min(max_of(c)));
        prop_assert!(greedy <= best * (1.0 + 1e-12), "greedy {} > optimum {}", greedy, best);
    }

    /// A token always lands on a replica of the expert it chose, and round robin over
    /// consecutive tokens splits an expert's tokens within one of equal.
    #[test]
    fn replica_choice_is_a_balanced_replica_of_the_expert(
        case in case(),
        source in 0_usize..16,
        tokens in 1_usize..64,
    ) {
        let plan = rebalance_layer(&case.load, &case.params(), EplbPolicy::Global).unwrap();
        let placement = ExpertPlacement::from_eplb(&case.config(), &plan).unwrap();
        let source = source % case.gpus();
        for expert in 0..case.num_logical {
            let replicas = placement.replicas(expert).unwrap();
            let mut per_replica = vec![0_usize; replicas.len()];
            for t in 0..tokens {
                let p = placement.select_replica(expert, t, source).unwrap();
                prop_assert_eq!(placement.physical_to_logical()[p], expert);
                let i = replicas.iter().position(|&r| r == p).unwrap();
                per_replica[i] += 1;
            }
            let (lo, hi) = (per_replica.iter().min().unwrap(), per_replica.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "{:?}", per_replica);
        }
    }
}

/// Calls `f` on every `c` with `c[i] >= 1` whose entries from `i` on add `extra` to their current
/// values.
fn enumerate(c: &mut Vec<usize>, i: usize, extra: usize, f: &mut impl FnMut(&[usize])) {
    if i + 1 == c.len() {
        c[i] += extra;
        f(c);
        c[i] -= extra;
        return;
    }
    for give in 0..=extra {
        c[i] += give;
        enumerate(c, i + 1, extra - give, f);
        c[i] -= give;
    }
}
