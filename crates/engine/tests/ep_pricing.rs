//! The fabric clock prices the EP runtime's real traffic: with redundant replicas, every step's
//! priced dispatch and combine bytes per GPU link equal what the runtime recorded moving
//! (`EpGroup::last_step_traffic`), and a different replica choice prices differently.

#![expect(
    clippy::unwrap_used,
    reason = "test: a failure is a test failure, with the panic's location"
)]

mod common;

use std::collections::BTreeMap;

use candle_core::Device;
use common::{model, requests, tiny_dir};
use pdserve_engine::{
    ClockConfig, Executor, ExecutorConfig, FabricStepClock, ModelExecutor, Request, RequestId,
    Scheduler, SchedulerConfig, StepRouting, StopConditions, WorkWeights,
};
use pdserve_ep::{EpGroup, EpRuntimeConfig, LayerTraffic, PlacementConfig};
use pdserve_fabric::{CollectiveKind, DispatchPath, LinkClass, Mode, Trace};
use pdserve_model::{Checkpoint, SamplingParams};

/// Bytes of one dispatched row at the tiny model's shape (hidden 64): FP8 values plus one 4-byte
/// scale per 128 elements.
const DISPATCH_ROW_BYTES: f64 = 64.0 + 4.0;
/// Bytes of one combined row: BF16.
const COMBINE_ROW_BYTES: f64 = 64.0 * 2.0;

/// Bytes per (model layer, dispatch (else combine), GPU, link) in a step's trace.
type LinkBytes = BTreeMap<(u32, bool, u32, LinkClass), f64>;

fn is_dispatch(kind: CollectiveKind) -> bool {
    kind == CollectiveKind::Dispatch
}

fn link_bytes(trace: &Trace) -> LinkBytes {
    let mut bytes = LinkBytes::new();
    for l in &trace.links {
        *bytes
            .entry((l.layer, is_dispatch(l.kind), l.busy.gpu, l.busy.class))
            .or_default() += l.busy.bytes;
    }
    bytes
}

/// What the recorded traffic of `layer` puts on each GPU's links: rows (one per token and remote
/// GPU) over NVLink on the forwarded path inside one NVLink domain, (token, expert) pairs over
/// the NIC on the direct path. Local messages cost nothing.
fn recorded_link_bytes(layer: &LayerTraffic, path: DispatchPath, into: &mut LinkBytes) {
    let d = layer.dispatch.num_ranks();
    let (tx, rx) = match path {
        DispatchPath::Forwarded => (LinkClass::NvlinkTx, LinkClass::NvlinkRx),
        DispatchPath::Direct => (LinkClass::NicTx, LinkClass::NicRx),
    };
    let units = |src: usize, dst: usize| match path {
        DispatchPath::Forwarded => layer.dispatch.rows(src, dst),
        DispatchPath::Direct => layer.dispatch.pairs(src, dst),
    };
    let l = layer.layer as u32;
    for src in 0..d {
        for dst in (0..d).filter(|&dst| dst != src) {
            let u = units(src, dst) as f64;
            if u == 0.0 {
                continue;
            }
            let (s, t) = (src as u32, dst as u32);
            let dispatch = true;
            *into.entry((l, dispatch, s, tx)).or_default() += u * DISPATCH_ROW_BYTES;
            *into.entry((l, dispatch, t, rx)).or_default() += u * DISPATCH_ROW_BYTES;
            // The combine sends the same rows back, in BF16.
            let combine = false;
            *into.entry((l, combine, t, tx)).or_default() += u * COMBINE_ROW_BYTES;
            *into.entry((l, combine, s, rx)).or_default() += u * COMBINE_ROW_BYTES;
        }
    }
}

/// `routing` with every pair of an expert that has several GPUs moved to its next GPU.
fn other_replicas(routing: &StepRouting) -> StepRouting {
    let mut other = routing.clone();
    let placements = routing.placements.as_ref().unwrap();
    let served = other.served_gpus.as_mut().unwrap();
    for ((layer, gpus), placement) in routing.layers.iter().zip(served).zip(placements) {
        for (&e, g) in layer.routing.ids.iter().zip(gpus.iter_mut()) {
            let copies = placement.gpus_of(e as usize);
            if let Some(i) = copies.iter().position(|c| c == g) {
                *g = copies[(i + 1) % copies.len()];
            }
        }
    }
    other
}

#[test]
fn the_clock_prices_the_replicas_the_ep_runtime_served() {
    // EP8 in one NVLink domain (forwarded: NVLink rows) and EP16 over two nodes (direct: NIC
    // pairs), each with 64 redundant slots, priced at the real model's own shape so that every
    // real MoE layer is priced exactly once. Two micro-batches per step.
    for (ep_size, path) in [(8u32, DispatchPath::Forwarded), (16, DispatchPath::Direct)] {
        let (m, _) = model();
        let ckpt = Checkpoint::open(&tiny_dir()).unwrap();
        let ep = EpRuntimeConfig {
            placement: PlacementConfig {
                num_ranks: ep_size as usize,
                num_redundant_experts: 64,
                ..PlacementConfig::default()
            },
            ..EpRuntimeConfig::default()
        };
        let group = EpGroup::load(&ckpt, ep, &Device::Cpu).unwrap();
        let scheduler = Scheduler::new(SchedulerConfig {
            num_kv_blocks: 64,
            max_context_tokens: 128,
            prefill_chunk_tokens: 16,
            two_batch_overlap: Some(WorkWeights::default()),
            ..SchedulerConfig::default()
        })
        .unwrap();
        let mut exec = ModelExecutor::new(
            m,
            group,
            ExecutorConfig::for_scheduler(scheduler.config(), ep_size),
        )
        .unwrap();
        let mut clock = FabricStepClock::new(ClockConfig {
            model: tiny_dir().join("config.json").display().to_string(),
            mode: Mode::Detailed,
            path,
            ep_size,
            ..ClockConfig::default()
        })
        .unwrap();
        let mut state = scheduler.new_state::<SamplingParams>();
        for r in requests(24, 0.0, 4) {
            let stop = StopConditions {
                max_tokens: Some(r.max_tokens),
                ..StopConditions::default()
            };
            state
                .add_request(Request::new(RequestId(r.id), r.prompt, r.params).with_stop(stop))
                .unwrap();
        }
        let mut priced_steps = 0;
        while state.has_work() {
            let plan = scheduler.step(0, &mut state).unwrap();
            let out = exec.execute(&plan).unwrap();
            if out.routing.num_rows > 0 {
                clock.record_next_step();
                clock.simulate(&plan, &out.routing).unwrap();
                let priced = link_bytes(&clock.take_trace().unwrap());
                let traffic = exec.experts().last_step_traffic();
                let mut recorded = LinkBytes::new();
                for layer in traffic.layers.iter().filter(|l| l.calls > 0) {
                    recorded_link_bytes(layer, path, &mut recorded);
                }
                assert!(!recorded.is_empty());
                assert_eq!(
                    priced, recorded,
                    "EP{ep_size} step {}: priced vs moved bytes",
                    plan.step_id
                );
                // Other replicas of the same experts put other bytes on the links.
                clock.record_next_step();
                clock
                    .simulate(&plan, &other_replicas(&out.routing))
                    .unwrap();
                let other = link_bytes(&clock.take_trace().unwrap());
                assert_ne!(other, recorded, "EP{ep_size} step {}", plan.step_id);
                priced_steps += 1;
            }
            state.apply(out.seqs).unwrap();
        }
        assert!(priced_steps >= 4, "{priced_steps} steps priced");
    }
}
