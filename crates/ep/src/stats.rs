//! Expert load statistics: how many tokens each logical expert received, per MoE layer.
//!
//! [`ExpertLoadStats`] counts the routing of every step (`record` per layer, then `finish_step`)
//! over a [`LoadWindow`]; [`ExpertLoadStats::snapshot`] returns the windowed load as an
//! [`ExpertLoad`], which is also the on-disk load file EPLB starts from.
//!
//! Invariants: every layer of an [`ExpertLoad`] has the same number of experts (at least one),
//! every value is finite and non-negative; a snapshot covers finished steps only.
//!
//! Load file format (JSON, version 1):
//!
//! ```json
//! { "version": 1, "num_logical_experts": 4, "steps": 100,
//!   "load": [[120.0, 3.0, 40.5, 0.0], [10.0, 10.0, 10.0, 10.0]] }
//! ```
//!
//! `load[l][e]` is the (possibly decayed) number of tokens routed to logical expert `e` of the
//! `l`-th MoE layer (MoE layers in model order; dense layers are not listed); `steps` is how many
//! steps the statistics cover.

use std::collections::VecDeque;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::EpError;
use crate::placement::check_routing_shape;

/// Load file format version written and accepted.
pub const LOAD_FILE_VERSION: u32 = 1;

/// Per-layer, per-logical-expert load (tokens), validated; also the JSON load file.
///
/// ```json
/// { "version": 1, "num_logical_experts": 4, "steps": 100,
///   "load": [[120.0, 3.0, 40.5, 0.0], [10.0, 10.0, 10.0, 10.0]] }
/// ```
///
/// `load[l][e]`: tokens (possibly decayed) routed to logical expert `e` of the `l`-th MoE layer,
/// dense layers not listed; `steps`: steps the statistics cover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LoadFileRepr", into = "LoadFileRepr")]
pub struct ExpertLoad {
    num_logical_experts: usize,
    steps: u64,
    load: Vec<Vec<f64>>,
}

/// The serde mirror of the load file, validated into [`ExpertLoad`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadFileRepr {
    /// Format version; must be [`LOAD_FILE_VERSION`].
    version: u32,
    /// Logical experts per layer; every row of `load` has this length.
    num_logical_experts: usize,
    /// Steps the statistics cover.
    #[serde(default)]
    steps: u64,
    /// `load[layer][expert]` in tokens.
    load: Vec<Vec<f64>>,
}

impl TryFrom<LoadFileRepr> for ExpertLoad {
    type Error = EpError;

    fn try_from(repr: LoadFileRepr) -> Result<Self, EpError> {
        if repr.version != LOAD_FILE_VERSION {
            return Err(EpError::field(
                "version",
                format!(
                    "{} is not supported (expected {LOAD_FILE_VERSION})",
                    repr.version
                ),
            ));
        }
        let mut load = Self::new(repr.load)?;
        if load.num_logical_experts != repr.num_logical_experts {
            return Err(EpError::field(
                "num_logical_experts",
                format!(
                    "says {} but the rows of `load` have {}",
                    repr.num_logical_experts, load.num_logical_experts
                ),
            ));
        }
        load.steps = repr.steps;
        Ok(load)
    }
}

impl From<ExpertLoad> for LoadFileRepr {
    fn from(load: ExpertLoad) -> Self {
        Self {
            version: LOAD_FILE_VERSION,
            num_logical_experts: load.num_logical_experts,
            steps: load.steps,
            load: load.load,
        }
    }
}

impl ExpertLoad {
    /// Validates `load[layer][expert]`: at least one layer, equal non-empty rows, finite
    /// non-negative values. `steps` starts at 0.
    pub fn new(load: Vec<Vec<f64>>) -> Result<Self, EpError> {
        let num_logical_experts = load.first().map_or(0, Vec::len);
        if num_logical_experts == 0 {
            return Err(EpError::field(
                "load",
                "needs at least one layer of at least one expert",
            ));
        }
        for (layer, row) in load.iter().enumerate() {
            if row.len() != num_logical_experts {
                return Err(EpError::field(
                    format!("load[{layer}]"),
                    format!(
                        "has {} experts, layer 0 has {num_logical_experts}",
                        row.len()
                    ),
                ));
            }
            if let Some(expert) = row.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return Err(EpError::field(
                    format!("load[{layer}][{expert}]"),
                    format!("{} is not a finite non-negative load", row[expert]),
                ));
            }
        }
        Ok(Self {
            num_logical_experts,
            steps: 0,
            load,
        })
    }

    /// The same load recorded as covering `steps` steps.
    #[must_use]
    pub fn with_steps(mut self, steps: u64) -> Self {
        self.steps = steps;
        self
    }

    /// Equal load on every expert of every layer.
    pub fn uniform(num_layers: usize, num_logical_experts: usize) -> Result<Self, EpError> {
        Self::new(vec![vec![1.0; num_logical_experts]; num_layers])
    }

    /// `load[layer][expert]`.
    pub fn layers(&self) -> &[Vec<f64>] {
        &self.load
    }

    /// One layer's per-expert load.
    pub fn layer(&self, layer: usize) -> Option<&[f64]> {
        self.load.get(layer).map(Vec::as_slice)
    }

    /// MoE layers covered.
    pub fn num_layers(&self) -> usize {
        self.load.len()
    }

    /// Logical experts per layer.
    pub fn num_logical_experts(&self) -> usize {
        self.num_logical_experts
    }

    /// Steps the statistics cover.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Total load over all layers and experts.
    pub fn total(&self) -> f64 {
        self.load.iter().flatten().sum()
    }

    /// Parses a load file's text.
    pub fn from_json_str(text: &str) -> Result<Self, EpError> {
        serde_json::from_str(text).map_err(|source| EpError::Json {
            path: Default::default(),
            source,
        })
    }

    /// The load file's text (one line per layer).
    pub fn to_json_string(&self) -> String {
        let mut out = format!(
            "{{\"version\": {LOAD_FILE_VERSION}, \"num_logical_experts\": {}, \"steps\": {},\n \"load\": [\n",
            self.num_logical_experts, self.steps
        );
        for (i, row) in self.load.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:?}")).collect();
            let sep = if i + 1 == self.load.len() { "" } else { "," };
            out.push_str(&format!("  [{}]{sep}\n", cells.join(", ")));
        }
        out.push_str(" ]}\n");
        out
    }

    /// Reads a load file.
    pub fn read(path: &Path) -> Result<Self, EpError> {
        let text = std::fs::read_to_string(path).map_err(|source| EpError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| EpError::Json {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes a load file.
    pub fn write(&self, path: &Path) -> Result<(), EpError> {
        std::fs::write(path, self.to_json_string()).map_err(|source| EpError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// Which past steps a snapshot weighs, and how.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LoadWindow {
    /// Every step since the start, equally.
    Cumulative,
    /// The last `steps` finished steps, equally. Keeps `steps × layers × experts` 4-byte
    /// counters (58 MoE layers × 256 experts × 1000 steps ≈ 59 MB).
    Sliding {
        /// Steps in the window (at least 1).
        steps: usize,
    },
    /// Every step, a step `a` steps old weighing `0.5^(a / half_life_steps)`: the moving average
    /// of historical statistics that DeepSeek's EPLB README suggests, in constant memory.
    ExponentialDecay {
        /// Age in steps at which a step's weight has halved (finite, > 0).
        half_life_steps: f64,
    },
}

impl Default for LoadWindow {
    fn default() -> Self {
        Self::ExponentialDecay {
            half_life_steps: 1000.0,
        }
    }
}

/// Per-layer counters of tokens routed to each logical expert, over a window of steps.
#[derive(Debug, Clone)]
pub struct ExpertLoadStats {
    window: LoadWindow,
    num_layers: usize,
    num_logical_experts: usize,
    /// Counts of the step in progress, `[layer × expert]`.
    current: Vec<u32>,
    /// Finished steps' counts (sliding window only), oldest first.
    history: VecDeque<Vec<u32>>,
    /// Windowed totals, `[layer × expert]`.
    totals: Vec<f64>,
    steps: u64,
}

impl ExpertLoadStats {
    /// Empty statistics for `num_layers` MoE layers of `num_logical_experts` experts.
    pub fn new(
        num_layers: usize,
        num_logical_experts: usize,
        window: LoadWindow,
    ) -> Result<Self, EpError> {
        if num_layers == 0 {
            return Err(EpError::field("stats.num_layers", "must be at least 1"));
        }
        if num_logical_experts == 0 {
            return Err(EpError::field(
                "stats.num_logical_experts",
                "must be at least 1",
            ));
        }
        match window {
            LoadWindow::Sliding { steps: 0 } => {
                return Err(EpError::field("window.steps", "must be at least 1"));
            }
            LoadWindow::ExponentialDecay { half_life_steps: h } if !(h.is_finite() && h > 0.0) => {
                return Err(EpError::field(
                    "window.half_life_steps",
                    format!("{h} is not a finite positive number of steps"),
                ));
            }
            _ => {}
        }
        let cells = num_layers * num_logical_experts;
        Ok(Self {
            window,
            num_layers,
            num_logical_experts,
            current: vec![0; cells],
            history: VecDeque::new(),
            totals: vec![0.0; cells],
            steps: 0,
        })
    }

    /// The window.
    pub fn window(&self) -> LoadWindow {
        self.window
    }

    /// MoE layers counted.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Logical experts per layer.
    pub fn num_logical_experts(&self) -> usize {
        self.num_logical_experts
    }

    /// Steps finished so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adds one layer's routing of the step in progress: logical expert ids `[n_tokens × k]`,
    /// row-major. May be called several times per layer and step (e.g. once per micro-batch).
    pub fn record(&mut self, layer: usize, topk_ids: &[u32], k: usize) -> Result<(), EpError> {
        check_routing_shape(topk_ids, k)?;
        let row = self.layer_row(layer)?;
        if let Some(&bad) = topk_ids
            .iter()
            .find(|&&e| e as usize >= self.num_logical_experts)
        {
            return Err(EpError::ExpertOutOfRange {
                field: format!("routing of layer {layer}"),
                expert: bad as usize,
                limit: self.num_logical_experts,
            });
        }
        let counts = &mut self.current[row];
        for &e in topk_ids {
            counts[e as usize] = counts[e as usize].saturating_add(1);
        }
        Ok(())
    }

    /// Adds per-expert token counts of one layer to the step in progress (as a GPU-side counter
    /// would report them).
    pub fn record_counts(&mut self, layer: usize, counts: &[u32]) -> Result<(), EpError> {
        let row = self.layer_row(layer)?;
        if counts.len() != self.num_logical_experts {
            return Err(EpError::field(
                "counts",
                format!(
                    "has {} entries for {} experts",
                    counts.len(),
                    self.num_logical_experts
                ),
            ));
        }
        for (slot, &c) in self.current[row].iter_mut().zip(counts) {
            *slot = slot.saturating_add(c);
        }
        Ok(())
    }

    fn layer_row(&self, layer: usize) -> Result<std::ops::Range<usize>, EpError> {
        if layer >= self.num_layers {
            return Err(EpError::LayerOutOfRange {
                layer,
                num_layers: self.num_layers,
            });
        }
        let start = layer * self.num_logical_experts;
        Ok(start..start + self.num_logical_experts)
    }

    /// Closes the step in progress and folds it into the window.
    pub fn finish_step(&mut self) {
        let step = std::mem::replace(&mut self.current, vec![0; self.totals.len()]);
        match self.window {
            LoadWindow::Cumulative => add_counts(&mut self.totals, &step),
            LoadWindow::Sliding { steps } => {
                add_counts(&mut self.totals, &step);
                self.history.push_back(step);
                while self.history.len() > steps {
                    if let Some(old) = self.history.pop_front() {
                        for (t, &c) in self.totals.iter_mut().zip(&old) {
                            // Integer sums below 2^53 are exact in f64, so this returns to the
                            // exact sum of the remaining steps.
                            *t -= f64::from(c);
                        }
                    }
                }
            }
            LoadWindow::ExponentialDecay { half_life_steps } => {
                let decay = 0.5_f64.powf(1.0 / half_life_steps);
                for (t, &c) in self.totals.iter_mut().zip(&step) {
                    *t = *t * decay + f64::from(c);
                }
            }
        }
        self.steps += 1;
    }

    /// The windowed load of the finished steps.
    pub fn snapshot(&self) -> ExpertLoad {
        ExpertLoad {
            num_logical_experts: self.num_logical_experts,
            steps: self.steps,
            load: self
                .totals
                .chunks(self.num_logical_experts)
                .map(|row| row.iter().map(|v| v.max(0.0)).collect())
                .collect(),
        }
    }
}

fn add_counts(totals: &mut [f64], step: &[u32]) {
    for (t, &c) in totals.iter_mut().zip(step) {
        *t += f64::from(c);
    }
}

#[cfg(test)]
mod tests;
