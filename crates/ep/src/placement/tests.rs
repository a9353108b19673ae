use super::*;

fn cfg(num_ranks: usize, num_logical: usize, num_redundant: usize) -> PlacementConfig {
    PlacementConfig {
        num_ranks,
        num_logical_experts: num_logical,
        num_redundant_experts: num_redundant,
        ..PlacementConfig::default()
    }
}

#[test]
fn contiguous_places_runs_of_experts_on_ranks() {
    let p = ExpertPlacement::contiguous(256, 8).unwrap();
    assert_eq!(p.experts_per_rank(), 32);
    assert_eq!(p.logical_on_rank(1), &(32..64).collect::<Vec<_>>()[..]);
    assert_eq!(p.rank_of_physical(255), Some(7));
    assert_eq!(p.rank_of_physical(256), None);
    assert_eq!(p.replicas(40), Some(&[40][..]));
    assert_eq!(p.num_redundant_experts(), 0);
    assert_eq!(p.num_nodes(), 1);
}

#[test]
fn deepseek_decode_shape_has_two_slots_per_gpu_over_18_nodes() {
    let p = ExpertPlacement::from_config(&cfg(144, 256, 32)).unwrap();
    assert_eq!(p.experts_per_rank(), 2);
    assert_eq!(p.num_nodes(), 18);
    // Default layout: slot p holds p mod 256, so experts 0..32 have a second replica.
    assert_eq!(p.replicas(0), Some(&[0, 256][..]));
    assert_eq!(p.replicas(32), Some(&[32][..]));
    assert_eq!(p.logical_on_rank(143), &[30, 31]);
    assert_eq!(p.node_of_rank(143), 17);
}

#[test]
fn slots_not_divisible_by_ranks_is_an_error_naming_the_fields() {
    let err = ExpertPlacement::from_config(&cfg(144, 256, 0)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EpError::SlotsNotDivisible { .. }));
    for field in ["num_logical_experts", "num_redundant_experts", "num_ranks"] {
        assert!(msg.contains(field), "{msg}");
    }
}

#[test]
fn expert_on_no_gpu_is_an_error_naming_the_expert() {
    let mut c = cfg(2, 4, 0);
    c.physical_to_logical = Some(vec![0, 1, 2, 2]);
    let err = ExpertPlacement::from_config(&c).unwrap_err();
    assert!(
        matches!(err, EpError::ExpertWithoutReplica { expert: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("placement.physical_to_logical"));
}

#[test]
fn map_entry_out_of_range_is_an_error_naming_its_index() {
    let mut c = cfg(2, 4, 0);
    c.physical_to_logical = Some(vec![0, 1, 2, 9]);
    let err = ExpertPlacement::from_config(&c).unwrap_err();
    assert!(err.to_string().contains("physical_to_logical[3]"), "{err}");
}

#[test]
fn map_of_wrong_length_is_an_error() {
    let mut c = cfg(2, 4, 2);
    c.physical_to_logical = Some(vec![0, 1, 2, 3]);
    let err = ExpertPlacement::from_config(&c).unwrap_err();
    assert!(err.to_string().contains("6"), "{err}");
}

#[test]
fn zero_sizes_and_partial_nodes_are_errors_naming_the_field() {
    let cases = [
        (cfg(0, 256, 0), "placement.num_ranks"),
        (cfg(8, 0, 0), "placement.num_logical_experts"),
        (
            PlacementConfig {
                gpus_per_node: 0,
                ..cfg(8, 256, 0)
            },
            "placement.gpus_per_node",
        ),
        (cfg(12, 252, 0), "placement.gpus_per_node"),
    ];
    for (c, field) in cases {
        let err = ExpertPlacement::from_config(&c).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[test]
fn dedicated_shared_ranks_must_be_distinct_in_range_and_non_empty() {
    let with = |ranks: Vec<usize>| PlacementConfig {
        shared_expert: SharedExpertPlacement::DedicatedRanks { ranks },
        ..cfg(8, 256, 0)
    };
    assert!(ExpertPlacement::from_config(&with(vec![])).is_err());
    let err = ExpertPlacement::from_config(&with(vec![1, 8])).unwrap_err();
    assert!(err.to_string().contains("shared_expert.ranks[1]"), "{err}");
    let err = ExpertPlacement::from_config(&with(vec![3, 3])).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let ok = ExpertPlacement::from_config(&with(vec![6, 7])).unwrap();
    assert_eq!(ok.shared_expert_ranks(), vec![6, 7]);
    // Tokens spread over the dedicated ranks.
    assert_eq!(ok.shared_expert_rank(0, 0), 6);
    assert_eq!(ok.shared_expert_rank(0, 1), 7);
    assert_eq!(ok.shared_expert_rank(1, 0), 7);
}

#[test]
fn shared_expert_on_every_rank_runs_locally() {
    let p = ExpertPlacement::contiguous(16, 4).unwrap();
    assert_eq!(p.shared_expert_ranks(), vec![0, 1, 2, 3]);
    assert_eq!(p.shared_expert_rank(2, 99), 2);
}

#[test]
fn round_robin_spreads_an_experts_tokens_evenly_over_replicas() {
    // Expert 0 has 3 replicas (slots 0, 4, 8) on ranks 0, 1, 2.
    let mut c = cfg(3, 8, 4);
    c.physical_to_logical = Some(vec![0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 1, 2]);
    let p = ExpertPlacement::from_config(&c).unwrap();
    let mut per_replica = [0; 3];
    for token in 0..30 {
        let phys = p.select_replica(0, token, 1).unwrap();
        per_replica[phys / 4] += 1;
    }
    assert_eq!(per_replica, [10, 10, 10]);
    // Token 0 of different source ranks starts on different replicas.
    assert_ne!(
        p.select_replica(0, 0, 0).unwrap(),
        p.select_replica(0, 0, 1).unwrap()
    );
}

#[test]
fn node_local_policy_prefers_replicas_on_the_source_node() {
    // 4 ranks, 2 per node, 2 slots per rank; expert 0 on rank 0 (node 0) and rank 3 (node 1).
    let c = PlacementConfig {
        gpus_per_node: 2,
        replica_policy: ReplicaPolicy::NodeLocalRoundRobin,
        physical_to_logical: Some(vec![0, 1, 2, 3, 4, 5, 0, 6]),
        ..cfg(4, 7, 1)
    };
    let p = ExpertPlacement::from_config(&c).unwrap();
    for token in 0..5 {
        assert_eq!(p.select_replica(0, token, 1).unwrap(), 0, "node 0 → slot 0");
        assert_eq!(p.select_replica(0, token, 2).unwrap(), 6, "node 1 → slot 6");
    }
    // An expert with no replica on the source node falls back to all replicas.
    assert_eq!(p.select_replica(5, 0, 0).unwrap(), 5);
    // Round robin instead alternates.
    let rr = p
        .clone()
        .with_replica_policy(ReplicaPolicy::TokenRoundRobin);
    assert_eq!(rr.select_replica(0, 0, 1).unwrap(), 6);
    assert_eq!(rr.select_replica(0, 1, 1).unwrap(), 0);
}

#[test]
fn map_routing_returns_physical_ids_of_the_same_logical_experts() {
    let p = ExpertPlacement::from_config(&cfg(4, 6, 2)).unwrap();
    let logical = [0_u32, 5, 1, 0, 2, 3];
    let physical = p.map_routing(&logical, 2, 3).unwrap();
    assert_eq!(physical.len(), 6);
    for (l, ph) in logical.iter().zip(&physical) {
        assert_eq!(p.physical_to_logical()[*ph as usize], *l as usize);
    }
    let counts = p.rank_token_counts(&physical).unwrap();
    assert_eq!(counts.iter().sum::<u64>(), 6);
}

#[test]
fn bad_routing_is_an_error_not_a_panic() {
    let p = ExpertPlacement::contiguous(8, 2).unwrap();
    assert!(matches!(
        p.map_routing(&[0, 1, 2], 2, 0),
        Err(EpError::RoutingShape { len: 3, k: 2 })
    ));
    assert!(matches!(
        p.map_routing(&[0, 8], 2, 0),
        Err(EpError::ExpertOutOfRange { expert: 8, .. })
    ));
    assert!(p.map_routing(&[0, 1], 2, 2).is_err(), "source rank 2 of 2");
    assert!(p.rank_token_counts(&[8]).is_err());
    assert!(p.expected_rank_loads(&[1.0; 7]).is_err());
}

#[test]
fn expected_rank_loads_conserve_total_load() {
    let p = ExpertPlacement::from_config(&cfg(4, 6, 2)).unwrap();
    let load = [6.0, 1.0, 2.0, 3.0, 4.0, 5.0];
    let ranks = p.expected_rank_loads(&load).unwrap();
    // Slots: [0,1][2,3][4,5][0,1]: experts 0 and 1 split over ranks 0 and 3.
    assert_eq!(ranks, vec![3.5, 5.0, 9.0, 3.5]);
}

#[test]
fn to_config_rebuilds_the_same_placement() {
    let p = ExpertPlacement::from_config(&cfg(16, 256, 32)).unwrap();
    assert_eq!(ExpertPlacement::from_config(&p.to_config()).unwrap(), p);
}

#[test]
fn ranks_of_experts_lists_each_holding_rank_once() {
    // Expert 0 has two slots on rank 0 (slots 0, 1) and one on rank 2 (slot 4).
    let mut c = cfg(3, 4, 2);
    c.physical_to_logical = Some(vec![0, 0, 1, 2, 0, 3]);
    let p = ExpertPlacement::from_config(&c).unwrap();
    assert_eq!(
        p.ranks_of_experts(),
        vec![vec![0, 2], vec![1], vec![1], vec![2]]
    );
}
