use super::*;
use crate::synthetic::{sample_routing, zipf_weights};
use crate::{Balance, EpError};

fn ep32() -> PlacementConfig {
    PlacementConfig {
        num_ranks: 32,
        num_redundant_experts: 32,
        ..PlacementConfig::default()
    }
}

fn every(period_steps: u64) -> RebalancerConfig {
    RebalancerConfig {
        period_steps,
        window: LoadWindow::Cumulative,
        ..RebalancerConfig::default()
    }
}

#[test]
fn auto_resolves_to_deepseeks_policy_per_stage() {
    let prefill = Rebalancer::new(ep32(), RebalancerConfig::default()).unwrap();
    assert_eq!(prefill.policy(), EplbPolicy::Hierarchical);
    let decode = PlacementConfig {
        num_ranks: 144,
        ..ep32()
    };
    let decode = Rebalancer::new(decode, RebalancerConfig::default()).unwrap();
    assert_eq!(decode.policy(), EplbPolicy::Global);
    assert_eq!(decode.params().num_nodes, 18);
}

#[test]
fn forcing_hierarchical_where_nodes_do_not_divide_groups_is_an_error() {
    let decode = PlacementConfig {
        num_ranks: 144,
        ..ep32()
    };
    let cfg = RebalancerConfig {
        policy: PolicyChoice::Hierarchical,
        ..RebalancerConfig::default()
    };
    let err = Rebalancer::new(decode, cfg.clone()).unwrap_err();
    assert!(err.to_string().contains("rebalancer.policy"), "{err}");
    // EP64: auto picks global, but hierarchical fits and may be forced.
    let ep64 = PlacementConfig {
        num_ranks: 64,
        num_redundant_experts: 64,
        ..ep32()
    };
    assert_eq!(
        Rebalancer::new(ep64.clone(), RebalancerConfig::default())
            .unwrap()
            .policy(),
        EplbPolicy::Global
    );
    assert_eq!(
        Rebalancer::new(ep64, cfg).unwrap().policy(),
        EplbPolicy::Hierarchical
    );
}

#[test]
fn invalid_configs_are_errors_naming_the_field() {
    let zero_groups = RebalancerConfig {
        num_expert_groups: 0,
        ..RebalancerConfig::default()
    };
    let err = Rebalancer::new(ep32(), zero_groups).unwrap_err();
    assert!(err.to_string().contains("num_expert_groups"), "{err}");
    let bad_slots = PlacementConfig {
        num_redundant_experts: 31,
        ..ep32()
    };
    assert!(matches!(
        Rebalancer::new(bad_slots, RebalancerConfig::default()),
        Err(EpError::SlotsNotDivisible { .. })
    ));
    let unknown = serde_json::from_str::<RebalancerConfig>(r#"{"period": 10}"#).unwrap_err();
    assert!(unknown.to_string().contains("period"), "{unknown}");
}

#[test]
fn rebalances_only_on_the_period_and_with_load() {
    let r = Rebalancer::new(ep32(), every(100)).unwrap();
    let mut stats = r.new_stats(1).unwrap();
    assert!(!r.is_due(0));
    assert!(r.is_due(100) && r.is_due(300));
    assert!(!r.is_due(150));
    // Due, but no load recorded yet.
    assert!(r.maybe_rebalance(100, &stats).unwrap().is_none());
    stats.record(0, &[1, 2, 3, 4, 5, 6, 7, 8], 8).unwrap();
    stats.finish_step();
    assert!(r.maybe_rebalance(99, &stats).unwrap().is_none());
    let placements = r.maybe_rebalance(100, &stats).unwrap().unwrap();
    assert_eq!(placements.len(), 1);
    assert_eq!(placements[0].experts_per_rank(), 9);
}

#[test]
fn period_zero_never_rebalances() {
    let r = Rebalancer::new(ep32(), every(0)).unwrap();
    let mut stats = r.new_stats(1).unwrap();
    stats.record(0, &[1], 1).unwrap();
    stats.finish_step();
    for step in [0, 1, 100, 1_000_000] {
        assert!(r.maybe_rebalance(step, &stats).unwrap().is_none());
    }
}

#[test]
fn stats_of_another_expert_count_are_an_error() {
    let r = Rebalancer::new(ep32(), every(1)).unwrap();
    let mut stats = ExpertLoadStats::new(1, 64, LoadWindow::Cumulative).unwrap();
    stats.record(0, &[1], 1).unwrap();
    stats.finish_step();
    let err = r.maybe_rebalance(1, &stats).unwrap_err();
    assert!(err.to_string().contains("num_logical_experts"), "{err}");
}

#[test]
fn rebalancing_from_routed_tokens_raises_balancedness() {
    let r = Rebalancer::new(ep32(), every(10)).unwrap();
    let weights = zipf_weights(256, 1.0, 21).unwrap();
    let mut stats = r.new_stats(1).unwrap();
    for step in 0..10 {
        let ids = sample_routing(&weights, 256, 8, step).unwrap();
        stats.record(0, &ids, 8).unwrap();
        stats.finish_step();
    }
    let after = r.maybe_rebalance(10, &stats).unwrap().unwrap().remove(0);
    let before = r.initial_placements(1).unwrap().remove(0);
    // Measure on fresh tokens, dispatched with the replica policy.
    let ids = sample_routing(&weights, 4096, 8, 99).unwrap();
    let count = |p: &ExpertPlacement| {
        let physical = p.map_routing(&ids, 8, 0).unwrap();
        Balance::of_counts(&p.rank_token_counts(&physical).unwrap())
    };
    let (b0, b1) = (count(&before), count(&after));
    assert!(
        b1.balancedness() > b0.balancedness() + 0.1,
        "{b0:?} → {b1:?}"
    );
}

#[test]
fn initial_placements_come_from_the_load_file_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    let mut layer = vec![1.0; 256];
    layer[42] = 500.0;
    ExpertLoad::new(vec![layer.clone(), vec![1.0; 256]])
        .unwrap()
        .write(&path)
        .unwrap();
    let cfg = RebalancerConfig {
        initial_load_file: Some(path.clone()),
        ..RebalancerConfig::default()
    };
    let r = Rebalancer::new(ep32(), cfg).unwrap();
    let placements = r.initial_placements(2).unwrap();
    assert!(placements[0].replicas(42).unwrap().len() > 1);
    let err = r.initial_placements(3).unwrap_err();
    assert!(err.to_string().contains("initial_load_file"), "{err}");

    let plain = Rebalancer::new(ep32(), RebalancerConfig::default()).unwrap();
    let default = plain.initial_placements(2).unwrap();
    assert_eq!(default[1], ExpertPlacement::from_config(&ep32()).unwrap());
}

#[test]
fn config_parses_from_json_with_defaults() {
    let cfg: RebalancerConfig = serde_json::from_str(
        r#"{"period_steps": 600, "policy": "global",
            "window": {"kind": "sliding", "steps": 50}}"#,
    )
    .unwrap();
    assert_eq!(cfg.period_steps, 600);
    assert_eq!(cfg.policy, PolicyChoice::Global);
    assert_eq!(cfg.window, LoadWindow::Sliding { steps: 50 });
    assert_eq!(cfg.num_expert_groups, 8);
    let r = Rebalancer::new(ep32(), cfg).unwrap();
    assert_eq!(r.policy(), EplbPolicy::Global);
    assert_eq!(
        r.new_stats(3).unwrap().window(),
        LoadWindow::Sliding { steps: 50 }
    );
}
