//! The step executor: runs a stage program over every GPU, pricing compute with the cost model
//! and collectives with the network model.
//!
//! State: each GPU's compute-stream clock (`free`) and comm-stream clock (`idle`), when each GPU
//! received each past collective, the traffic plans in use and the timeline being recorded.
//! Collectives are processed in comm-stream order; before collective `k`, every GPU runs its
//! compute ops up to `k`'s trigger, so every op's waits refer to collectives already priced.
//! A plan is taken from its [`PlanSource`] when first needed (its MLP stage or its first
//! collective) and dropped after its last collective, which keeps the working set to a few plans
//! however many routing layers a step has. With more than one plan thread ([`Fabric::plan_threads`])
//! the plans are built ahead by workers in the order the executor first needs them
//! ([`crate::ahead`]); the executor takes each from the one worker that built it, so the outcome
//! and the trace do not depend on the thread count.

use crate::ahead::{PlanBuilder, PlanSource};
use crate::batch::{AttentionLoad, Phase, StepBatch};
use crate::cost::StageCost;
use crate::error::FabricError;
use crate::fabric::{Fabric, Mode};
use crate::network::LinkBusy;
use crate::plan::TrafficPlan;
use crate::schedule::{self, LayerKind, NONE, Program, StageKind};
use crate::step::{CollectiveTiming, StepInput, StepOutcome};
use crate::trace::{CommSlice, ComputeSlice, LinkSlice, Trace};

/// Per-GPU durations of the stages that do not depend on routing, per micro-batch.
struct Durations {
    attn0: Vec<Vec<f64>>,
    attn1: Vec<Vec<f64>>,
    attn: Vec<Vec<f64>>,
    shared: Vec<Vec<f64>>,
    dense: Vec<Vec<f64>>,
    head: Vec<Vec<f64>>,
    mtp_extra: Vec<Vec<f64>>,
}

pub(crate) struct Executor<'f, 'i> {
    fabric: &'f Fabric,
    input: &'i StepInput<'i>,
    n: usize,
    layers: Vec<LayerKind>,
    main_moe_layers: usize,
    mbs: usize,
    program: Program,
    durations: Durations,
    /// Builds a slot's plan; `source` says on which thread.
    builder: PlanBuilder<'f, 'i>,
    source: PlanSource,
    /// Index `routing_index * mbs + mb`; `None` before first and after last use.
    plans: Vec<Option<TrafficPlan>>,
    /// Whether each slot's plan has been taken from `source`.
    built: Vec<bool>,
    /// MLP durations per plan index (kept after the plan is dropped).
    mlp: Vec<Vec<f64>>,
    /// The last collective that uses each plan.
    last_use: Vec<usize>,
    pos: usize,
    free: Vec<f64>,
    busy: Vec<f64>,
    op_end: Vec<f64>,
    idle: Vec<f64>,
    received: Vec<Vec<f64>>,
    layer_end: Vec<f64>,
    stage_busy: Vec<(StageKind, f64)>,
    collectives: Vec<CollectiveTiming>,
    trace: Option<Trace>,
}

impl<'f, 'i> Executor<'f, 'i> {
    /// Prepares the program, the routing-independent durations and the plan bookkeeping.
    pub(crate) fn new(fabric: &'f Fabric, input: &'i StepInput<'i>) -> Result<Self, FabricError> {
        let n = fabric.topology.num_gpus() as usize;
        let layers = layer_kinds(fabric, input.mtp);
        let main_moe_layers = layers[..fabric.shape.num_hidden_layers as usize]
            .iter()
            .filter(|l| matches!(l, LayerKind::Moe(_)))
            .count();
        let program = schedule::build(input.phase, input.schedule, &layers)?;
        let mbs = input.schedule.micro_batches();
        let ranges = micro_batch_ranges(input.batch, input.phase, mbs);
        let durations = durations(fabric, input, &ranges);
        let slots = (input.routing.len() + usize::from(input.mtp_routing.is_some())) * mbs;
        let mut exec = Self {
            fabric,
            input,
            n,
            layers,
            main_moe_layers,
            mbs,
            program,
            durations,
            builder: PlanBuilder {
                fabric,
                input,
                ranges,
                mbs,
            },
            source: PlanSource::Inline,
            plans: (0..slots).map(|_| None).collect(),
            built: vec![false; slots],
            mlp: vec![Vec::new(); slots],
            last_use: vec![0; slots],
            pos: 0,
            free: vec![0.0; n],
            busy: vec![0.0; n],
            op_end: vec![0.0; n],
            idle: vec![0.0; n],
            received: Vec::new(),
            layer_end: Vec::new(),
            stage_busy: Vec::new(),
            collectives: Vec::new(),
            trace: input.record_trace.then(|| Trace::new(n as u32)),
        };
        for (k, c) in exec.program.colls.iter().enumerate() {
            let idx = exec.plan_index(c.moe_index, c.mb);
            if let Some(last) = exec.last_use.get_mut(idx) {
                *last = k;
            }
        }
        exec.layer_end = vec![0.0; exec.layers.len()];
        exec.received = Vec::with_capacity(exec.program.colls.len());
        exec.collectives = Vec::with_capacity(exec.program.colls.len());
        Ok(exec)
    }

    /// Runs the program to the end, with the plans built ahead on the fabric's plan threads when
    /// it has more than one and the step more than one plan (see [`crate::ahead`]).
    pub(crate) fn run(self) -> Result<StepOutcome, FabricError> {
        let order = self.first_use_order();
        let threads = self.fabric.plan_threads.min(order.len());
        if threads <= 1 {
            return self.execute();
        }
        let builder = self.builder.clone();
        std::thread::scope(|scope| {
            let source = PlanSource::spawn(scope, &builder, &order, self.plans.len(), threads);
            Self { source, ..self }.execute()
        })
    }

    fn execute(mut self) -> Result<StepOutcome, FabricError> {
        for k in 0..self.program.colls.len() {
            self.run_ops(self.program.trigger_op[k] + 1)?;
            self.collective(k)?;
        }
        self.run_ops(self.program.ops.len())?;
        let duration_us = self
            .free
            .iter()
            .chain(self.idle.iter())
            .copied()
            .fold(0.0f64, f64::max);
        // Layers end in order: a layer is done when it and all before it are.
        for i in 1..self.layer_end.len() {
            self.layer_end[i] = self.layer_end[i].max(self.layer_end[i - 1]);
        }
        self.stage_busy.sort_by_key(|(s, _)| *s);
        let n = self.n as f64;
        Ok(StepOutcome {
            duration_us,
            layer_end_us: self.layer_end,
            stage_busy_us: self.stage_busy,
            collectives: self.collectives,
            compute_busy_us: self.busy.iter().sum::<f64>() / n,
            tokens: self.input.batch.ranks.iter().map(|r| r.tokens()).sum(),
            trace: self.trace,
        })
    }

    /// The plan slot of MoE layer `moe_index`, micro-batch `mb` (cyclic routing reuse).
    fn plan_index(&self, moe_index: usize, mb: u8) -> usize {
        let r = self.input.routing.len().max(1);
        let routing_index = if moe_index >= self.main_moe_layers && self.input.mtp_routing.is_some()
        {
            r
        } else {
            moe_index % r
        };
        routing_index * self.mbs + usize::from(mb)
    }

    fn ensure_plan(&mut self, idx: usize) -> Result<(), FabricError> {
        if self.built.get(idx).copied().unwrap_or(true) {
            return Ok(());
        }
        let (plan, mlp) = self.source.take(idx, &self.builder)?;
        self.mlp[idx] = mlp;
        self.plans[idx] = Some(plan);
        self.built[idx] = true;
        Ok(())
    }

    /// Plan slots in the order the executor first needs them, each once.
    fn first_use_order(&self) -> Vec<usize> {
        let mut seen = vec![false; self.plans.len()];
        let mut order = Vec::with_capacity(self.plans.len());
        let mut need = |idx: usize| {
            if let Some(s) = seen.get_mut(idx)
                && !*s
            {
                *s = true;
                order.push(idx);
            }
        };
        let mut pos = 0;
        let mlp_slot = |pos: usize| {
            let op = self.program.ops[pos];
            match self.layers.get(op.layer as usize) {
                Some(LayerKind::Moe(i)) if op.stage == StageKind::Mlp => {
                    Some(self.plan_index(*i, op.mb))
                }
                _ => None,
            }
        };
        for (k, coll) in self.program.colls.iter().enumerate() {
            while pos < self.program.trigger_op[k] + 1 {
                if let Some(idx) = mlp_slot(pos) {
                    need(idx);
                }
                pos += 1;
            }
            need(self.plan_index(coll.moe_index, coll.mb));
        }
        for p in pos..self.program.ops.len() {
            if let Some(idx) = mlp_slot(p) {
                need(idx);
            }
        }
        order
    }

    fn duration(&mut self, stage: StageKind, layer: u32, m: usize, g: usize) -> f64 {
        let d = &self.durations;
        let mtp_extra = if layer == self.fabric.shape.num_hidden_layers as u32 {
            d.mtp_extra[m][g]
        } else {
            0.0
        };
        match stage {
            StageKind::Attn0 => d.attn0[m][g] + mtp_extra,
            StageKind::Attn1 => d.attn1[m][g],
            StageKind::Attn => d.attn[m][g] + mtp_extra,
            StageKind::Shared => d.shared[m][g],
            StageKind::DenseFfn => d.dense[m][g],
            StageKind::Head => d.head[m][g],
            StageKind::Mlp => {
                let moe_index = match self.layers.get(layer as usize) {
                    Some(LayerKind::Moe(i)) => *i,
                    _ => 0,
                };
                self.mlp[self.plan_index(moe_index, m as u8)]
                    .get(g)
                    .copied()
                    .unwrap_or(0.0)
            }
        }
    }

    /// Runs compute ops `pos..upto` on every GPU.
    fn run_ops(&mut self, upto: usize) -> Result<(), FabricError> {
        while self.pos < upto {
            let op = self.program.ops[self.pos];
            let m = usize::from(op.mb);
            if op.stage == StageKind::Mlp
                && let Some(LayerKind::Moe(i)) = self.layers.get(op.layer as usize)
            {
                let idx = self.plan_index(*i, op.mb);
                self.ensure_plan(idx)?;
            }
            let mut total = 0.0;
            for g in 0..self.n {
                let d = self.duration(op.stage, op.layer, m, g);
                let mut start = self.free[g];
                for w in op.waits {
                    if w != NONE {
                        start = start.max(self.received[w as usize][g]);
                    }
                }
                let end = start + d;
                self.free[g] = end;
                self.busy[g] += d;
                total += d;
                self.op_end[g] = end;
                if let Some(l) = self.layer_end.get_mut(op.layer as usize) {
                    *l = l.max(end);
                }
                if let Some(t) = self.trace.as_mut()
                    && d > 0.0
                {
                    t.compute.push(ComputeSlice {
                        gpu: g as u32,
                        stage: op.stage,
                        layer: op.layer,
                        micro_batch: op.mb,
                        start_us: start,
                        end_us: end,
                    });
                }
            }
            let mean = total / self.n as f64;
            match self.stage_busy.iter_mut().find(|(s, _)| *s == op.stage) {
                Some((_, v)) => *v += mean,
                None => self.stage_busy.push((op.stage, mean)),
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// Issues and prices collective `k`.
    fn collective(&mut self, k: usize) -> Result<(), FabricError> {
        let coll = self.program.colls[k];
        let issue: Vec<f64> = self
            .op_end
            .iter()
            .zip(&self.idle)
            .map(|(e, i)| e.max(*i))
            .collect();
        let idx = self.plan_index(coll.moe_index, coll.mb);
        self.ensure_plan(idx)?;
        let Some(plan) = self.plans[idx].as_ref() else {
            return Err(FabricError::invalid(
                "step",
                "program",
                "a collective's plan was dropped early",
            ));
        };
        let result =
            self.fabric
                .simulate_collective(plan, coll.kind, &issue, self.trace.is_some())?;
        if self.last_use[idx] == k {
            self.plans[idx] = None;
        }
        let start_us = issue.iter().copied().fold(f64::INFINITY, f64::min);
        let end_us = result
            .received_us
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let mean_latency_us = result
            .received_us
            .iter()
            .zip(&issue)
            .map(|(r, i)| r - i)
            .sum::<f64>()
            / self.n as f64;
        if let Some(l) = self.layer_end.get_mut(coll.layer as usize) {
            *l = l.max(end_us);
        }
        self.collectives.push(CollectiveTiming {
            kind: coll.kind,
            layer: coll.layer,
            micro_batch: coll.mb,
            start_us,
            end_us,
            mean_latency_us,
            nic_bytes: result.nic_bytes,
            nvlink_bytes: result.nvlink_bytes,
        });
        if let Some(t) = self.trace.as_mut() {
            t.links
                .extend(result.links.iter().map(|b: &LinkBusy| LinkSlice {
                    busy: *b,
                    kind: coll.kind,
                    layer: coll.layer,
                    micro_batch: coll.mb,
                }));
            for (g, (&i, &r)) in issue.iter().zip(&result.received_us).enumerate() {
                t.comm.push(CommSlice {
                    gpu: g as u32,
                    kind: coll.kind,
                    layer: coll.layer,
                    micro_batch: coll.mb,
                    start_us: i,
                    end_us: r,
                });
            }
        }
        self.idle = result.idle_us;
        self.received.push(result.received_us);
        Ok(())
    }
}

/// Dense or MoE, per modeled layer (the MTP layer last when on). Analysis mode charges EP traffic
/// on every layer, as the paper does.
fn layer_kinds(fabric: &Fabric, mtp: bool) -> Vec<LayerKind> {
    let s = &fabric.shape;
    let mut layers: Vec<LayerKind> = Vec::with_capacity(s.num_hidden_layers as usize + 1);
    let mut moe = 0usize;
    for l in 0..s.num_hidden_layers {
        let ep = match fabric.mode {
            Mode::Analysis => s.is_moe(),
            Mode::Detailed => !s.is_dense_layer(l),
        };
        if ep {
            layers.push(LayerKind::Moe(moe));
            moe += 1;
        } else {
            layers.push(LayerKind::Dense);
        }
    }
    if mtp {
        layers.push(if s.is_moe() {
            LayerKind::Moe(moe)
        } else {
            LayerKind::Dense
        });
    }
    layers
}

fn durations(fabric: &Fabric, input: &StepInput<'_>, ranges: &[Vec<(usize, usize)>]) -> Durations {
    let n = fabric.topology.num_gpus() as usize;
    let mbs = ranges.len();
    let zeros = || vec![vec![0.0; n]; mbs];
    let mut d = Durations {
        attn0: zeros(),
        attn1: zeros(),
        attn: zeros(),
        shared: zeros(),
        dense: zeros(),
        head: zeros(),
        mtp_extra: zeros(),
    };
    if fabric.mode == Mode::Analysis {
        return d;
    }
    let c = &fabric.cost;
    let t = |cost: StageCost| c.time_us(&cost, input.phase);
    for (m, range) in ranges.iter().enumerate() {
        for (g, (&(lo, hi), rank)) in range.iter().zip(&input.batch.ranks).enumerate() {
            let load: AttentionLoad = rank.attention_load(lo as u64, hi as u64);
            let tokens = load.tokens;
            d.attn0[m][g] = t(c.decode_attn0(&load));
            d.attn1[m][g] = t(c.decode_attn1(&load));
            d.attn[m][g] = t(c.prefill_attn(&load));
            d.shared[m][g] = t(c.shared_experts(tokens));
            d.dense[m][g] = t(c.dense_ffn(tokens));
            d.head[m][g] = t(c.lm_head(tokens));
            // The MTP layer starts with the main model's LM head and the MTP projection.
            d.mtp_extra[m][g] = t(c.lm_head(tokens)) + t(c.mtp_projection(tokens));
        }
    }
    d
}

/// Token ranges of each micro-batch on each rank.
fn micro_batch_ranges(batch: &StepBatch, phase: Phase, mbs: usize) -> Vec<Vec<(usize, usize)>> {
    let total: Vec<usize> = batch.ranks.iter().map(|r| r.tokens() as usize).collect();
    if mbs == 1 {
        return vec![total.iter().map(|&t| (0, t)).collect()];
    }
    let split: Vec<usize> = batch
        .ranks
        .iter()
        .map(|r| r.split_point(phase) as usize)
        .collect();
    vec![
        split.iter().map(|&s| (0, s)).collect(),
        split.iter().zip(&total).map(|(&s, &t)| (s, t)).collect(),
    ]
}
