//! The EP runtime against the single-process model: equal outputs for many placements, traffic
//! that conserves (token, expert) pairs, determinism, EPLB rebalancing that lowers the busiest
//! rank's load, and errors that name what is wrong.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a test failure, with the panic's location"
)]

mod common;

use candle_core::{Device, Tensor};
use common::{bits, config, gate_routing, hidden, max_abs_diff, ranks, tiny_checkpoint};
use pdserve_ep::synthetic::{sample_routing, zipf_weights};
use pdserve_ep::{
    EpGroup, ExpertLoad, ExpertPlacement, LoadWindow, PlacementConfig, PolicyChoice, Rebalancer,
    RebalancerConfig, ReplicaPolicy, SharedExpertPlacement,
};
use pdserve_model::{
    Checkpoint, ContiguousLatentCache, DeepSeekV3, ForwardOptions, LocalExperts, MoeExperts,
    Routing, SequenceInput,
};

const TOL: f32 = 1e-5;

/// A load where expert 7 is 200x hotter than the rest and experts 100..104 10x.
fn skewed_load(layers: usize) -> ExpertLoad {
    let mut row = vec![10.0; 256];
    row[7] = 2000.0;
    row[100..104].fill(100.0);
    ExpertLoad::new(vec![row; layers]).unwrap()
}

/// Compares EP and local routed outputs on every MoE layer for `group`.
fn assert_matches_local(ckpt: &Checkpoint, group: &EpGroup, local: &LocalExperts, what: &str) {
    let h = ckpt.config().hidden_size;
    let n = 40;
    for (i, &layer) in group.moe_layers().iter().enumerate() {
        let x = hidden(n, h, 11 + i as u64);
        let routing = gate_routing(ckpt, n, 23 + i as u64);
        let token_ranks = ranks(n, group.ep_size(), 31 + i as u64);
        let want = local.routed_forward(layer, &x, &routing).unwrap();
        let got = group
            .batch(&token_ranks)
            .unwrap()
            .routed_forward(layer, &x, &routing)
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < TOL, "{what}, layer {layer}: max diff {diff}");
    }
}

#[test]
fn ep_output_equals_local_experts_for_contiguous_redundant_and_eplb_placements() {
    let ckpt = tiny_checkpoint();
    let local = LocalExperts::load(&ckpt, &Device::Cpu).unwrap();
    let cpu = &Device::Cpu;
    let layers = 3;

    // D = 1, 8 and 32 (and DeepSeek's decode EP144) with the configured layouts.
    for (d, r) in [(1, 0), (8, 0), (8, 8), (32, 32), (144, 32)] {
        let group = EpGroup::load(&ckpt, config(d, r), cpu).unwrap();
        assert_matches_local(&ckpt, &group, &local, &format!("EP{d} R{r}"));
    }

    // EPLB-produced placements: hierarchical and global at EP32, and EP8 with an expert so hot
    // it gets more replicas than there are GPUs (a rank holds two slots of it).
    for (d, r, policy) in [
        (32, 32, PolicyChoice::Hierarchical),
        (32, 32, PolicyChoice::Global),
        (8, 32, PolicyChoice::Auto),
    ] {
        let mut cfg = config(d, r);
        cfg.rebalancer.policy = policy;
        let rebalancer = Rebalancer::new(cfg.placement.clone(), cfg.rebalancer.clone()).unwrap();
        let placements = rebalancer.placements_for(&skewed_load(layers)).unwrap();
        if d == 8 {
            let hot = placements[0].logical_on_rank(0);
            let doubled = (0..d).any(|rank| {
                let on = placements[0].logical_on_rank(rank);
                on.iter().filter(|&&e| e == 7).count() > 1
            });
            assert!(
                doubled,
                "the test needs a rank with two slots of expert 7: {hot:?}"
            );
        }
        let group = EpGroup::with_placements(&ckpt, cfg, placements, cpu).unwrap();
        assert_matches_local(&ckpt, &group, &local, &format!("EPLB {policy:?} EP{d}"));
    }

    // Node-local replica choice and the shared expert on dedicated ranks.
    let mut cfg = config(32, 32);
    cfg.placement.replica_policy = ReplicaPolicy::NodeLocalRoundRobin;
    cfg.placement.shared_expert = SharedExpertPlacement::DedicatedRanks { ranks: vec![0, 8] };
    let group = EpGroup::load(&ckpt, cfg, cpu).unwrap();
    assert_matches_local(&ckpt, &group, &local, "node-local EP32");
}

#[test]
fn whole_model_through_the_ep_group_matches_local_experts() {
    let ckpt = tiny_checkpoint();
    let cpu = &Device::Cpu;
    let model = DeepSeekV3::from_checkpoint(&ckpt, cpu).unwrap();
    let local = LocalExperts::load(&ckpt, cpu).unwrap();
    let group = EpGroup::load(&ckpt, config(8, 8), cpu).unwrap();
    let c = model.config();
    let opts = ForwardOptions::default();
    let batch = [
        SequenceInput::new(1, vec![0, 17, 42, 5], 0),
        SequenceInput::new(2, vec![0, 9, 3], 0),
    ];
    // Request 1 lives on DP rank 2, request 2 on rank 6.
    let token_ranks = [2, 2, 2, 2, 6, 6, 6];
    let mut cache_local = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, cpu);
    let mut cache_ep = ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, cpu);
    let want = model
        .forward(&batch, &mut cache_local, &local, &opts)
        .unwrap();
    group.set_token_ranks(&token_ranks).unwrap();
    let got = model.forward(&batch, &mut cache_ep, &group, &opts).unwrap();
    // The same experts in every layer (the weights differ by float reassociation only).
    assert_eq!(got.routing.layers.len(), want.routing.layers.len());
    for (g, w) in got.routing.layers.iter().zip(&want.routing.layers) {
        assert_eq!((g.layer, &g.routing.ids), (w.layer, &w.routing.ids));
        for (a, b) in g.routing.weights.iter().zip(&w.routing.weights) {
            assert!((a - b).abs() < TOL, "layer {}: weight {a} vs {b}", g.layer);
        }
    }
    let diff = max_abs_diff(&got.logits, &want.logits);
    assert!(diff < 1e-4, "logits differ by {diff}");

    // The MTP module (MoE layer 3) on the same rows: next tokens, main hidden states.
    let next = [
        SequenceInput::new(1, vec![17, 42, 5, 8], 0),
        SequenceInput::new(2, vec![9, 3, 4], 0),
    ];
    let want_mtp = model
        .mtp_forward(&next, &want.hidden, &mut cache_local, &local, &opts)
        .unwrap();
    let got_mtp = model
        .mtp_forward(
            &next,
            &got.hidden,
            &mut cache_ep,
            &group.batch(&token_ranks).unwrap(),
            &opts,
        )
        .unwrap();
    let diff = max_abs_diff(&got_mtp.logits, &want_mtp.logits);
    assert!(diff < 1e-4, "MTP logits differ by {diff}");
}

/// The exact per-rank pairs ep's placement functions give for `routing` from `token_ranks`.
fn expected_received_pairs(
    placement: &ExpertPlacement,
    routing: &Routing,
    token_ranks: &[u32],
) -> Vec<u64> {
    let d = placement.num_ranks();
    let k = routing.top_k;
    let mut total = vec![0u64; d];
    for src in 0..d {
        let ids: Vec<u32> = (0..token_ranks.len())
            .filter(|&t| token_ranks[t] as usize == src)
            .flat_map(|t| routing.ids_of(t).to_vec())
            .collect();
        let physical = placement.map_routing(&ids, k, src).unwrap();
        for (t, c) in placement
            .rank_token_counts(&physical)
            .unwrap()
            .iter()
            .enumerate()
        {
            total[t] += c;
        }
    }
    total
}

#[test]
fn dispatch_and_combine_move_every_pair_once_each_way() {
    let ckpt = tiny_checkpoint();
    let h = ckpt.config().hidden_size;
    for (d, r) in [(1, 0), (8, 8), (32, 32)] {
        let mut cfg = config(d, r);
        if d == 32 {
            cfg.placement.shared_expert =
                SharedExpertPlacement::DedicatedRanks { ranks: vec![3, 17] };
        }
        let mut group = EpGroup::load(&ckpt, cfg, &Device::Cpu).unwrap();
        // Two micro-batches of the same layer in one step.
        let (n0, n1) = (48, 16);
        let r0 = gate_routing(&ckpt, n0, 5);
        let r1 = gate_routing(&ckpt, n1, 6);
        let t0 = ranks(n0, d, 7);
        let t1 = ranks(n1, d, 8);
        for (n, routing, token_ranks, seed) in [(n0, &r0, &t0, 1), (n1, &r1, &t1, 2)] {
            group
                .batch(token_ranks)
                .unwrap()
                .routed_forward(2, &hidden(n, h, seed), routing)
                .unwrap();
        }
        group.finish_step().unwrap();
        let traffic = group.last_step_traffic();
        assert_eq!(traffic.step, 0);
        let layer = traffic.layer(2).unwrap();
        assert_eq!(layer.calls, 2);
        assert_eq!(traffic.layer(1).unwrap().calls, 0, "layer 1 did not run");
        let k = 8u64;
        let tokens = (n0 + n1) as u64;
        assert_eq!(layer.tokens(), tokens);
        assert_eq!(layer.dispatch.total_pairs(), tokens * k);
        assert_eq!(layer.combine.total_pairs(), tokens * k);
        assert_eq!(
            layer.combine,
            layer.dispatch.transpose(),
            "every row sent comes back"
        );
        // Rows: one per (token, distinct destination rank), recomputed from the placement.
        let placement = group.placement(2).unwrap();
        let mut rows = 0u64;
        let mut expected_pairs = vec![0u64; d];
        for (routing, token_ranks) in [(&r0, &t0), (&r1, &t1)] {
            let mut seen = vec![0usize; d];
            for (t, &src) in token_ranks.iter().enumerate() {
                let index = seen[src as usize];
                seen[src as usize] += 1;
                let mut dests: Vec<usize> = routing
                    .ids_of(t)
                    .iter()
                    .map(|&e| {
                        let p = placement
                            .select_replica(e as usize, index, src as usize)
                            .unwrap();
                        placement.rank_of_physical(p).unwrap()
                    })
                    .collect();
                dests.sort_unstable();
                dests.dedup();
                rows += dests.len() as u64;
            }
            for (a, b) in expected_pairs.iter_mut().zip(expected_received_pairs(
                placement,
                routing,
                token_ranks,
            )) {
                *a += b;
            }
        }
        assert_eq!(layer.dispatch.total_rows(), rows);
        assert_eq!(layer.dispatch.received_pairs(), expected_pairs);
        // Bytes at the real shape: f32 rows of width h, local rows free.
        assert_eq!(layer.row_bytes, (h * 4) as u64);
        assert_eq!(
            layer.dispatch_remote_bytes(),
            layer.dispatch.remote_rows() * (h * 4) as u64
        );
        // The shared expert: one row per token, to the rank that runs it.
        assert_eq!(layer.shared.total_rows(), tokens);
        if d == 1 {
            assert_eq!(
                layer.dispatch.remote_rows(),
                0,
                "one rank: everything is local"
            );
            assert_eq!(layer.dispatch.local_rows(), tokens);
        }
        if d == 32 {
            let to_shared: u64 = (0..d)
                .map(|s| layer.shared.rows(s, 3) + layer.shared.rows(s, 17))
                .sum();
            assert_eq!(
                to_shared, tokens,
                "dedicated shared ranks receive every token"
            );
            assert!(layer.dispatch.remote_rows() > 0);
        }
        // The fabric's view of the same layer.
        let fabric_routing = layer.fabric_routing().unwrap();
        assert_eq!(fabric_routing.total_tokens() as u64, tokens);
        let fabric_placements = group.fabric_placements().unwrap();
        assert_eq!(fabric_placements.len(), 3);
        assert_eq!(fabric_placements[0].num_gpus() as usize, d);
    }
}

/// The (source, destination) copy counts of a fabric flow set, `[src × d + dst]`.
fn flow_matrix(flows: &pdserve_fabric::FlowSet, d: usize) -> Vec<u64> {
    let mut m = vec![0u64; d * d];
    for f in flows.flows() {
        m[f.src as usize * d + f.dst as usize] += u64::from(f.units);
    }
    m
}

/// `matrix` with its diagonal (local messages, never on a link) zeroed.
fn off_diagonal(matrix: &[u64], d: usize) -> Vec<u64> {
    let mut m = matrix.to_vec();
    for r in 0..d {
        m[r * d + r] = 0;
    }
    m
}

#[test]
fn the_fabric_prices_exactly_the_replicas_the_runtime_served() {
    use pdserve_fabric::{
        DispatchPath, Fabric, FabricConfig, HardwareProfile, LayerRouting, Mode, ModelShape,
    };
    let ckpt = tiny_checkpoint();
    let h = ckpt.config().hidden_size;
    // EP8 (one NVLink domain) and EP32 (four nodes), each with redundant replicas.
    for (d, r) in [(8, 8), (32, 32)] {
        let mut group = EpGroup::load(&ckpt, config(d, r), &Device::Cpu).unwrap();
        let (n0, n1) = (40, 24);
        for (n, seed) in [(n0, 1u64), (n1, 2)] {
            group
                .batch(&ranks(n, d, seed + 10))
                .unwrap()
                .routed_forward(1, &hidden(n, h, seed), &gate_routing(&ckpt, n, seed + 20))
                .unwrap();
        }
        group.finish_step().unwrap();
        let traffic = group.last_step_traffic();
        let layer = traffic.layer(1).unwrap();
        let k = layer.top_k;
        // Served ranks agree with the matrices: pairs per (source, served rank), and one row per
        // (token, distinct served rank).
        assert_eq!(layer.served_ranks.len(), (n0 + n1) * k);
        assert_eq!(group.last_step_served_ranks()[0], layer.served_ranks);
        let mut pairs = vec![0u64; d * d];
        let mut rows = vec![0u64; d * d];
        for (&src, served) in layer.source_ranks.iter().zip(layer.served_ranks.chunks(k)) {
            let mut distinct = served.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            for &dst in served {
                pairs[src as usize * d + dst as usize] += 1;
            }
            for dst in distinct {
                rows[src as usize * d + dst as usize] += 1;
            }
        }
        assert_eq!(pairs, layer.dispatch.pair_matrix());
        assert_eq!(rows, layer.dispatch.row_matrix());

        let placement = &group.fabric_placements().unwrap()[0];
        let served = layer.fabric_routing().unwrap();
        let tokens: Vec<u32> = layer.tokens_per_rank.iter().map(|&t| t as u32).collect();
        let experts: Vec<u16> = (0..d)
            .flat_map(|g| served.experts_of(g, 0..served.tokens_of(g)).to_vec())
            .collect();
        let own_choice = LayerRouting::new(k, &tokens, experts).unwrap();
        let ranges: Vec<(usize, usize)> = tokens.iter().map(|&t| (0, t as usize)).collect();
        let fabric = |path| {
            Fabric::new(FabricConfig {
                profile: HardwareProfile::builtin("h800").unwrap(),
                shape: ModelShape::deepseek_v3().unwrap(),
                ep_size: d as u32,
                mode: Mode::Detailed,
                path,
            })
            .unwrap()
        };
        // Direct path: every remote pair crosses a NIC to its served rank.
        let direct = fabric(DispatchPath::Direct);
        let plan = direct.plan(placement, &served, &ranges, "routing").unwrap();
        assert_eq!(
            flow_matrix(&plan.nic, d),
            off_diagonal(layer.dispatch.pair_matrix(), d)
        );
        let received: Vec<u64> = plan.pairs.iter().map(|&p| u64::from(p)).collect();
        assert_eq!(
            received,
            layer.dispatch.received_pairs(),
            "expert load per GPU"
        );
        // The fabric's own replica rule moves other copies.
        let own = direct
            .plan(placement, &own_choice, &ranges, "routing")
            .unwrap();
        assert_ne!(
            flow_matrix(&own.nic, d),
            off_diagonal(layer.dispatch.pair_matrix(), d)
        );
        // Forwarded path in one NVLink domain: one NVLink row per (token, remote served rank).
        if d == 8 {
            let forwarded = fabric(DispatchPath::Forwarded);
            let plan = forwarded
                .plan(placement, &served, &ranges, "routing")
                .unwrap();
            assert!(plan.nic.is_empty());
            assert_eq!(
                flow_matrix(&plan.nvlink, d),
                off_diagonal(layer.dispatch.row_matrix(), d)
            );
        }
    }
}

#[test]
fn results_are_deterministic_and_independent_of_compute_threads() {
    let ckpt = tiny_checkpoint();
    let h = ckpt.config().hidden_size;
    let n = 64;
    let x = hidden(n, h, 3);
    let routing = gate_routing(&ckpt, n, 4);
    let token_ranks = ranks(n, 32, 5);
    let run = |threads: usize| -> Tensor {
        let mut cfg = config(32, 32);
        cfg.compute_threads = threads;
        let group = EpGroup::load(&ckpt, cfg, &Device::Cpu).unwrap();
        group.set_token_ranks(&token_ranks).unwrap();
        let a = group.routed_forward(1, &x, &routing).unwrap();
        let b = group.routed_forward(1, &x, &routing).unwrap();
        assert_eq!(bits(&a), bits(&b), "the same forward twice");
        a
    };
    assert_eq!(bits(&run(1)), bits(&run(3)), "threads do not change a bit");
}

/// Runs layers 1..=3 on a Zipf-skewed routing for `d` ranks and finishes the step.
fn skewed_step(
    group: &mut EpGroup,
    ckpt: &Checkpoint,
    n: usize,
) -> Option<pdserve_ep::RebalanceReport> {
    let h = ckpt.config().hidden_size;
    let d = group.ep_size();
    for layer in [1, 2, 3] {
        let popularity = zipf_weights(256, 1.2, layer as u64).unwrap();
        let ids = sample_routing(&popularity, n, 8, 100 + layer as u64).unwrap();
        let routing = Routing {
            top_k: 8,
            weights: vec![0.3; ids.len()],
            ids,
        };
        group
            .batch(&ranks(n, d, 9))
            .unwrap()
            .routed_forward(layer, &hidden(n, h, layer as u64), &routing)
            .unwrap();
    }
    group.finish_step().unwrap()
}

#[test]
fn periodic_eplb_lowers_the_busiest_rank_load_and_keeps_outputs_exact() {
    let ckpt = tiny_checkpoint();
    let local = LocalExperts::load(&ckpt, &Device::Cpu).unwrap();
    let mut cfg = config(16, 16);
    cfg.rebalancer = RebalancerConfig {
        period_steps: 2,
        window: LoadWindow::Cumulative,
        ..RebalancerConfig::default()
    };
    let mut group = EpGroup::load(&ckpt, cfg, &Device::Cpu).unwrap();
    let n = 256;
    assert!(
        skewed_step(&mut group, &ckpt, n).is_none(),
        "not due after one step"
    );
    let report = skewed_step(&mut group, &ckpt, n).expect("due after two steps");
    let before: Vec<f64> = group
        .balance()
        .unwrap()
        .iter()
        .map(|b| b.last_step.max)
        .collect();
    assert_eq!(report.after_steps, 2);
    assert!(report.moves.total_experts() > 0, "weights moved");
    assert_eq!(
        report.moves.total_bytes(),
        report.moves.total_experts() * 3 * 64 * 8 * 4
    );
    for (b, a) in report.before.iter().zip(&report.after) {
        assert!(
            a.max < b.max,
            "expected max load falls: {} -> {}",
            b.max,
            a.max
        );
    }

    // The same skewed step again, on the new placement.
    assert!(skewed_step(&mut group, &ckpt, n).is_none());
    let balance = group.balance().unwrap();
    for (b, after) in before.iter().zip(&balance) {
        assert!(
            after.last_step.max < *b,
            "layer {}: busiest rank {b} -> {}",
            after.layer,
            after.last_step.max
        );
        assert!(after.windowed.balancedness() > 0.0 && after.windowed.balancedness() <= 1.0);
    }
    // Moved weights compute what the checkpoint's do.
    assert_matches_local(&ckpt, &group, &local, "after rebalancing");
}

#[test]
fn initial_placement_is_planned_from_the_load_file() {
    let ckpt = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    let load = skewed_load(3);
    load.write(&path).unwrap();
    let mut cfg = config(8, 8);
    cfg.rebalancer.initial_load_file = Some(path);
    let group = EpGroup::load(&ckpt, cfg.clone(), &Device::Cpu).unwrap();
    let rebalancer = Rebalancer::new(cfg.placement, cfg.rebalancer).unwrap();
    assert_eq!(
        group.placements(),
        rebalancer.placements_for(&load).unwrap().as_slice()
    );
    assert!(group.placement(1).unwrap().replicas(7).unwrap().len() > 1);
}

#[test]
fn misuse_is_reported_with_what_is_wrong() {
    let ckpt = tiny_checkpoint();
    let h = ckpt.config().hidden_size;
    let cpu = &Device::Cpu;
    let mut group = EpGroup::load(&ckpt, config(8, 0), cpu).unwrap();
    let x = hidden(4, h, 1);
    let routing = gate_routing(&ckpt, 4, 2);

    let err = group
        .routed_forward(1, &x, &routing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("set_token_ranks"), "{err}");
    let err = group
        .set_token_ranks(&[0, 1, 9, 2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 2") && err.contains("rank 9"), "{err}");
    group.set_token_ranks(&[0, 1, 2]).unwrap();
    let err = group
        .routed_forward(1, &x, &routing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 rows") && err.contains("4 hidden rows"),
        "{err}"
    );
    group.set_token_ranks(&[0, 1, 2, 3]).unwrap();
    let err = group
        .routed_forward(0, &x, &routing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 0 is not an MoE layer"), "{err}");

    let mut bad = config(8, 0);
    bad.placement.num_logical_experts = 64;
    let err = EpGroup::load(&ckpt, bad, cpu).unwrap_err().to_string();
    assert!(
        err.contains("placement.num_logical_experts") && err.contains("256"),
        "{err}"
    );
    let mut bad = config(8, 0);
    bad.rebalancer.num_expert_groups = 4;
    let err = EpGroup::load(&ckpt, bad, cpu).unwrap_err().to_string();
    assert!(err.contains("rebalancer.num_expert_groups"), "{err}");

    let other = ExpertPlacement::from_config(&PlacementConfig {
        num_ranks: 8,
        num_redundant_experts: 8,
        ..PlacementConfig::default()
    })
    .unwrap();
    let before = group.placements().to_vec();
    let err = group
        .apply_placements(vec![other; 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("placements[0]"), "{err}");
    assert_eq!(
        group.placements(),
        before.as_slice(),
        "a refused placement changes nothing"
    );
}

#[test]
fn group_and_batch_views_can_cross_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<EpGroup>();
    shareable::<pdserve_ep::EpBatch<'static>>();
}
