use super::*;
use crate::synthetic::zipf_weights;
use crate::{Balance, ExpertPlacement, PlacementConfig};

fn params(num_physical: usize, groups: usize, nodes: usize, gpus: usize) -> EplbParams {
    EplbParams {
        num_physical_experts: num_physical,
        num_groups: groups,
        num_nodes: nodes,
        num_gpus: gpus,
    }
}

#[test]
fn reproduces_the_readme_example_of_deepseek_eplb() {
    // deepseek-ai/EPLB README: 2 layers × 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs; the
    // printed physical-to-logical map of its hierarchical policy.
    let load = vec![
        vec![
            90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0,
        ],
        vec![
            20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0,
        ],
    ];
    let plans = rebalance_experts(&load, &params(16, 4, 2, 8), EplbPolicy::Hierarchical).unwrap();
    assert_eq!(
        plans[0].physical_to_logical,
        vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    );
    assert_eq!(
        plans[1].physical_to_logical,
        vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
    );
    assert_eq!(plans[0].replica_counts[5], 2);
    assert_eq!(plans[0].logical_to_physical[5], vec![0, 2]);
}

fn skewed_layer(seed: u64) -> Vec<f64> {
    zipf_weights(256, 1.0, seed)
        .unwrap()
        .into_iter()
        .map(|w| w * 8.0 * 4096.0)
        .collect()
}

fn max_and_balancedness(placement: &ExpertPlacement, load: &[f64]) -> (f64, f64) {
    let b = Balance::of(&placement.expected_rank_loads(load).unwrap());
    (b.max, b.balancedness())
}

fn check_improves(num_ranks: usize, policy: EplbPolicy) {
    let config = PlacementConfig {
        num_ranks,
        num_redundant_experts: 32,
        ..PlacementConfig::default()
    };
    let load = skewed_layer(11);
    let before = ExpertPlacement::from_config(&config).unwrap();
    let p = params(288, 8, config.num_nodes(), num_ranks);
    let plan = rebalance_layer(&load, &p, policy).unwrap();
    let after = ExpertPlacement::from_eplb(&config, &plan).unwrap();
    let (max0, bal0) = max_and_balancedness(&before, &load);
    let (max1, bal1) = max_and_balancedness(&after, &load);
    assert!(max1 < max0, "EP{num_ranks}: max {max1} !< {max0}");
    assert!(bal1 > bal0, "EP{num_ranks}: balancedness {bal1} !> {bal0}");
}

#[test]
fn hierarchical_lowers_max_gpu_load_of_zipf_experts_at_ep32() {
    check_improves(32, EplbPolicy::Hierarchical);
}

#[test]
fn global_lowers_max_gpu_load_of_zipf_experts_at_ep144() {
    check_improves(144, EplbPolicy::Global);
}

#[test]
fn a_few_hot_experts_get_the_redundant_slots() {
    let mut load = vec![10.0; 256];
    for hot in [3, 77, 200] {
        load[hot] = 1000.0;
    }
    let plan = rebalance_layer(&load, &params(288, 8, 4, 32), EplbPolicy::Hierarchical).unwrap();
    // Group packing puts the three hot groups on three different nodes; each node has 8 extra
    // slots, and 1000 / 9 > 10, so the hot expert takes all 8 of them: 9 replicas.
    for hot in [3, 77, 200] {
        assert_eq!(plan.replica_counts[hot], 9, "expert {hot}");
    }
    assert_eq!(plan.replica_counts.iter().sum::<usize>(), 288);
}

#[test]
fn hierarchical_keeps_groups_and_their_replicas_inside_one_node() {
    let load = skewed_layer(5);
    let (groups, nodes, gpus) = (8, 4, 32);
    let plan = rebalance_layer(
        &load,
        &params(288, groups, nodes, gpus),
        EplbPolicy::Hierarchical,
    )
    .unwrap();
    let slots_per_node = 288 / nodes;
    let mut groups_per_node = vec![std::collections::BTreeSet::new(); nodes];
    for expert in 0..256 {
        let nodes_of: std::collections::BTreeSet<usize> = plan.logical_to_physical[expert]
            .iter()
            .map(|p| p / slots_per_node)
            .collect();
        assert_eq!(
            nodes_of.len(),
            1,
            "expert {expert} spans nodes {nodes_of:?}"
        );
        let node = *nodes_of.iter().next().unwrap();
        groups_per_node[node].insert(expert / 32);
    }
    for (node, gs) in groups_per_node.iter().enumerate() {
        assert_eq!(gs.len(), groups / nodes, "node {node} holds groups {gs:?}");
    }
}

#[test]
fn every_gpu_holds_the_same_number_of_slots_and_every_expert_a_replica() {
    for (policy, nodes, gpus) in [
        (EplbPolicy::Hierarchical, 1, 8),
        (EplbPolicy::Hierarchical, 4, 32),
        (EplbPolicy::Global, 18, 144),
    ] {
        let plan = rebalance_layer(&skewed_layer(3), &params(288, 8, nodes, gpus), policy).unwrap();
        assert_eq!(plan.physical_to_logical.len(), 288);
        assert!(plan.replica_counts.iter().all(|&c| c >= 1));
        let config = PlacementConfig {
            num_ranks: gpus,
            num_redundant_experts: 32,
            ..PlacementConfig::default()
        };
        // from_eplb re-validates every invariant and the plan's internal consistency.
        let placement = ExpertPlacement::from_eplb(&config, &plan).unwrap();
        assert_eq!(placement.experts_per_rank(), 288 / gpus);
    }
}

#[test]
fn eplb_is_deterministic() {
    let load = vec![skewed_layer(1), skewed_layer(2)];
    let p = params(288, 8, 4, 32);
    for policy in [EplbPolicy::Hierarchical, EplbPolicy::Global] {
        assert_eq!(
            rebalance_experts(&load, &p, policy).unwrap(),
            rebalance_experts(&load, &p, policy).unwrap()
        );
    }
}

#[test]
fn zero_load_still_gives_a_valid_plan() {
    let plan = rebalance_layer(&[0.0; 256], &params(288, 8, 18, 144), EplbPolicy::Global).unwrap();
    assert!(plan.replica_counts.iter().all(|&c| c >= 1));
}

#[test]
fn hierarchical_with_nodes_not_dividing_groups_is_an_error_naming_num_nodes() {
    let err = rebalance_layer(
        &[1.0; 256],
        &params(288, 8, 18, 144),
        EplbPolicy::Hierarchical,
    )
    .unwrap_err();
    assert!(err.to_string().contains("eplb.num_nodes"), "{err}");
}

#[test]
fn bad_shapes_and_loads_are_errors_naming_the_field() {
    let cases = [
        (params(288, 8, 4, 31), vec![1.0; 256], "eplb.num_nodes"),
        (params(290, 8, 4, 32), vec![1.0; 256], "eplb.num_gpus"),
        (
            params(128, 8, 4, 32),
            vec![1.0; 256],
            "eplb.num_physical_experts",
        ),
        (params(288, 7, 1, 32), vec![1.0; 256], "eplb.num_groups"),
    ];
    for (p, load, field) in cases {
        let err = rebalance_layer(&load, &p, EplbPolicy::Hierarchical).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let mut load = vec![vec![1.0; 256]; 2];
    load[1][9] = f64::NAN;
    let err = rebalance_experts(&load, &params(288, 8, 4, 32), EplbPolicy::Global).unwrap_err();
    assert!(err.to_string().contains("load[1][9]"), "{err}");
}

#[test]
fn auto_picks_hierarchical_for_small_ep_and_global_for_large_ep() {
    let auto = |nodes, gpus| EplbPolicy::auto(&params(288, 8, nodes, gpus), 256);
    assert_eq!(auto(1, 8), EplbPolicy::Hierarchical);
    assert_eq!(
        auto(4, 32),
        EplbPolicy::Hierarchical,
        "DeepSeek prefill EP32"
    );
    assert_eq!(auto(2, 16), EplbPolicy::Hierarchical);
    assert_eq!(
        auto(8, 64),
        EplbPolicy::Global,
        "one group per node: nothing to balance"
    );
    assert_eq!(auto(18, 144), EplbPolicy::Global, "DeepSeek decode EP144");
    assert_eq!(auto(3, 24), EplbPolicy::Global);
}

#[test]
fn eplb_can_lose_to_a_lucky_contiguous_layout() {
    // No redundancy, 2 GPUs of 3 experts. Contiguous {3, 3, 0} {2, 2, 2} is perfectly balanced;
    // greedy packing puts 3, 2, 2 together. EPLB is a heuristic, not a guarantee.
    let load = [3.0, 3.0, 0.0, 2.0, 2.0, 2.0];
    let config = PlacementConfig {
        num_ranks: 2,
        num_logical_experts: 6,
        ..PlacementConfig::default()
    };
    let contiguous = ExpertPlacement::from_config(&config).unwrap();
    let plan = rebalance_layer(&load, &params(6, 1, 1, 2), EplbPolicy::Global).unwrap();
    let eplb = ExpertPlacement::from_eplb(&config, &plan).unwrap();
    assert_eq!(max_and_balancedness(&contiguous, &load).0, 6.0);
    assert_eq!(max_and_balancedness(&eplb, &load).0, 7.0);
}
