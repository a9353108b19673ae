//! Step timelines and their export as Chrome/Perfetto trace JSON.
//!
//! Tracks: process 0 holds one thread per GPU compute stream, process 1 one thread per GPU comm
//! stream (each collective from issue to arrival), process 2 one thread per link direction (busy
//! intervals with bytes). Times are µs, the trace format's unit. The JSON is a function of the
//! timeline alone (fixed field order, fixed float formatting), so the same step gives
//! byte-identical output.

use serde::Serialize;
use serde_json::{Value, json};

use crate::network::{CollectiveKind, LinkBusy};
use crate::schedule::StageKind;
use crate::topology::LinkClass;

/// One op on one GPU's compute stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ComputeSlice {
    /// GPU.
    pub gpu: u32,
    /// Stage.
    pub stage: StageKind,
    /// Modeled layer (`num_hidden_layers` = the MTP layer or the head).
    pub layer: u32,
    /// Micro-batch.
    pub micro_batch: u8,
    /// Start, µs.
    pub start_us: f64,
    /// End, µs.
    pub end_us: f64,
}

/// One collective on one GPU's comm stream, from issue to arrival.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CommSlice {
    /// GPU.
    pub gpu: u32,
    /// Dispatch or combine.
    pub kind: CollectiveKind,
    /// Modeled layer.
    pub layer: u32,
    /// Micro-batch.
    pub micro_batch: u8,
    /// Issue, µs.
    pub start_us: f64,
    /// All data received, µs.
    pub end_us: f64,
}

/// One link's busy interval in one collective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSlice {
    /// The interval and bytes.
    pub busy: LinkBusy,
    /// Dispatch or combine.
    pub kind: CollectiveKind,
    /// Modeled layer.
    pub layer: u32,
    /// Micro-batch.
    pub micro_batch: u8,
}

/// A step's timeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Trace {
    /// GPUs in the step.
    pub gpus: u32,
    /// Compute ops.
    pub compute: Vec<ComputeSlice>,
    /// Collectives per GPU.
    pub comm: Vec<CommSlice>,
    /// Link busy intervals.
    pub links: Vec<LinkSlice>,
}

fn kind_label(kind: CollectiveKind) -> &'static str {
    match kind {
        CollectiveKind::Dispatch => "DISPATCH",
        CollectiveKind::Combine => "COMBINE",
    }
}

fn class_index(class: LinkClass) -> u32 {
    match class {
        LinkClass::NicTx => 0,
        LinkClass::NicRx => 1,
        LinkClass::NvlinkTx => 2,
        LinkClass::NvlinkRx => 3,
    }
}

fn slice(name: String, pid: u32, tid: u32, start_us: f64, end_us: f64, args: Value) -> Value {
    json!({"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": start_us, "dur": end_us - start_us, "args": args})
}

fn meta(kind: &str, pid: u32, tid: Option<u32>, name: String) -> Value {
    match tid {
        Some(tid) => {
            json!({"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        }
        None => json!({"name": kind, "ph": "M", "pid": pid, "args": {"name": name}}),
    }
}

impl Trace {
    /// An empty timeline of `gpus` GPUs.
    pub fn new(gpus: u32) -> Self {
        Self {
            gpus,
            ..Self::default()
        }
    }

    /// The timeline as Chrome trace-event JSON (open in Perfetto or chrome://tracing).
    pub fn to_chrome_json(&self) -> String {
        let mut events =
            Vec::with_capacity(self.compute.len() + self.comm.len() + self.links.len() + 8);
        events.push(meta("process_name", 0, None, "GPU compute streams".into()));
        events.push(meta("process_name", 1, None, "GPU comm streams".into()));
        events.push(meta("process_name", 2, None, "links".into()));
        for g in 0..self.gpus {
            events.push(meta("thread_name", 0, Some(g), format!("GPU {g} compute")));
            events.push(meta("thread_name", 1, Some(g), format!("GPU {g} comm")));
            for class in LinkClass::ALL {
                events.push(meta(
                    "thread_name",
                    2,
                    Some(g * 4 + class_index(class)),
                    format!("GPU {g} {}", class.label()),
                ));
            }
        }
        for c in &self.compute {
            events.push(slice(
                format!("{}({})", c.stage.label(), c.micro_batch),
                0,
                c.gpu,
                c.start_us,
                c.end_us,
                json!({"layer": c.layer, "micro_batch": c.micro_batch}),
            ));
        }
        for c in &self.comm {
            events.push(slice(
                format!("{}({})", kind_label(c.kind), c.micro_batch),
                1,
                c.gpu,
                c.start_us,
                c.end_us,
                json!({"layer": c.layer, "micro_batch": c.micro_batch}),
            ));
        }
        for l in &self.links {
            events.push(slice(
                format!("{}({}) L{}", kind_label(l.kind), l.micro_batch, l.layer),
                2,
                l.busy.gpu * 4 + class_index(l.busy.class),
                l.busy.start_us,
                l.busy.end_us,
                json!({"bytes": l.busy.bytes, "layer": l.layer, "micro_batch": l.micro_batch}),
            ));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ns"}).to_string()
    }
}
