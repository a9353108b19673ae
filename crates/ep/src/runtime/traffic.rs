//! What the EP transport moved: per-(source rank, destination rank) matrices, per MoE layer.
//!
//! A dispatch message carries one token's hidden row from its source (DP) rank to a destination
//! (EP) rank, **once per (token, destination rank)** however many of the token's experts that
//! rank hosts (as DeepEP sends a token once per GPU); it lists the (expert, weight) pairs the rank
//! must apply. The combine message carries the rank's weighted sum for that token back: again one
//! row per (token, rank). A message whose source and destination are the same rank is *local*: it
//! is counted (on the diagonal) but never crosses a link.
//!
//! Invariants of a [`LayerTraffic`] recorded by the runtime (tested in `tests/ep_runtime.rs`):
//! - `dispatch.total_pairs() == combine.total_pairs() == tokens × top_k`: every (token, expert)
//!   pair moves exactly once each way;
//! - `combine` is the transpose of `dispatch` (rows and pairs): every row sent comes back;
//! - `dispatch.total_rows()` = Σ over tokens of the distinct ranks its experts were served on;
//! - bytes at the real shape are `rows × row_bytes`, `row_bytes = hidden × 4` (f32 rows);
//! - `served_ranks` names the rank each (token, expert) pair was dispatched to: counted per
//!   (`source_ranks[row]`, served rank) they are `dispatch.pairs`, and the distinct served ranks
//!   of each token are its `dispatch.rows`.
//!
//! The fabric charges time at the *modeled* shape: [`DispatchMatrix`] gives it row and pair
//! counts, which it multiplies by its own bytes per row (FP8 dispatch, BF16 combine at hidden
//! 7168 for DeepSeek-V3).

/// Message counts between every (source, destination) pair of ranks, for one collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchMatrix {
    num_ranks: usize,
    /// `rows[src × D + dst]`: hidden rows sent from `src` to `dst`.
    rows: Vec<u64>,
    /// `pairs[src × D + dst]`: (token, expert) pairs those rows carry.
    pairs: Vec<u64>,
}

impl DispatchMatrix {
    /// An all-zero matrix over `num_ranks` ranks.
    pub fn new(num_ranks: usize) -> Self {
        Self {
            num_ranks,
            rows: vec![0; num_ranks * num_ranks],
            pairs: vec![0; num_ranks * num_ranks],
        }
    }

    /// Ranks covered.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// Rows sent from `src` to `dst` (0 outside the group).
    pub fn rows(&self, src: usize, dst: usize) -> u64 {
        self.cell(&self.rows, src, dst)
    }

    /// (token, expert) pairs sent from `src` to `dst` (0 outside the group).
    pub fn pairs(&self, src: usize, dst: usize) -> u64 {
        self.cell(&self.pairs, src, dst)
    }

    fn cell(&self, v: &[u64], src: usize, dst: usize) -> u64 {
        if src < self.num_ranks && dst < self.num_ranks {
            v[src * self.num_ranks + dst]
        } else {
            0
        }
    }

    /// The row counts, `[src × D + dst]`.
    pub fn row_matrix(&self) -> &[u64] {
        &self.rows
    }

    /// The pair counts, `[src × D + dst]`.
    pub fn pair_matrix(&self) -> &[u64] {
        &self.pairs
    }

    /// Adds one message of `pairs` pairs from `src` to `dst` (both `< D`, checked by callers).
    pub(crate) fn add(&mut self, src: usize, dst: usize, rows: u64, pairs: u64) {
        let i = src * self.num_ranks + dst;
        self.rows[i] += rows;
        self.pairs[i] += pairs;
    }

    /// Adds every cell of `other` (same group size, checked by callers).
    pub(crate) fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.rows.iter_mut().zip(&other.rows) {
            *a += b;
        }
        for (a, b) in self.pairs.iter_mut().zip(&other.pairs) {
            *a += b;
        }
    }

    /// The matrix with sources and destinations swapped.
    pub fn transpose(&self) -> Self {
        let d = self.num_ranks;
        let mut t = Self::new(d);
        for s in 0..d {
            for r in 0..d {
                t.rows[r * d + s] = self.rows[s * d + r];
                t.pairs[r * d + s] = self.pairs[s * d + r];
            }
        }
        t
    }

    /// All rows.
    pub fn total_rows(&self) -> u64 {
        self.rows.iter().sum()
    }

    /// All pairs.
    pub fn total_pairs(&self) -> u64 {
        self.pairs.iter().sum()
    }

    /// Rows whose source and destination are the same rank (never on a link).
    pub fn local_rows(&self) -> u64 {
        (0..self.num_ranks).map(|r| self.rows(r, r)).sum()
    }

    /// Rows that cross a link (source ≠ destination).
    pub fn remote_rows(&self) -> u64 {
        self.total_rows() - self.local_rows()
    }

    /// Pairs each rank receives (column sums): its expert compute load, the load EPLB balances.
    pub fn received_pairs(&self) -> Vec<u64> {
        let d = self.num_ranks;
        (0..d)
            .map(|dst| (0..d).map(|src| self.pairs(src, dst)).sum())
            .collect()
    }

    /// Rows each rank receives (column sums).
    pub fn received_rows(&self) -> Vec<u64> {
        let d = self.num_ranks;
        (0..d)
            .map(|dst| (0..d).map(|src| self.rows(src, dst)).sum())
            .collect()
    }

    /// Rows each rank sends (row sums).
    pub fn sent_rows(&self) -> Vec<u64> {
        let d = self.num_ranks;
        (0..d)
            .map(|src| (0..d).map(|dst| self.rows(src, dst)).sum())
            .collect()
    }

    /// Bytes on links (local rows excluded) when a row is `row_bytes` bytes.
    pub fn remote_bytes(&self, row_bytes: u64) -> u64 {
        self.remote_rows() * row_bytes
    }
}

/// The traffic of one MoE layer over the forwards of one step (several with micro-batches).
///
/// As recorded by the runtime: `dispatch` and `combine` each carry `tokens × top_k` pairs,
/// `combine == dispatch.transpose()`, and `shared` carries one row per token (module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTraffic {
    /// The model layer index (the MTP layer is `num_hidden_layers`).
    pub layer: usize,
    /// Forwards of this layer folded in (0: the layer did not run this step).
    pub calls: u32,
    /// Routed experts per token.
    pub top_k: usize,
    /// Bytes of one hidden row at the real shape (`hidden × 4`, f32).
    pub row_bytes: u64,
    /// Tokens each (source) rank contributed.
    pub tokens_per_rank: Vec<u64>,
    /// Routed dispatch: hidden rows from token source ranks to the ranks of the chosen replicas.
    pub dispatch: DispatchMatrix,
    /// Routed combine: weighted sums from expert ranks back to the token source ranks.
    pub combine: DispatchMatrix,
    /// Shared-expert rows from token source ranks to the rank that runs the shared expert for
    /// them: the diagonal when every rank holds it (`shared_expert = every_rank`), the dedicated
    /// ranks otherwise. The model computes the shared expert itself (the `MoeExperts` contract
    /// covers routed experts only); this matrix is what that placement would move, one row
    /// per token each way, for the fabric to charge.
    pub shared: DispatchMatrix,
    /// Logical expert ids of each source rank's tokens, `top_k` per token, in the order the
    /// tokens appeared (forward by forward, row by row): the fabric's `LayerRouting` input.
    pub routing_by_rank: Vec<Vec<u32>>,
    /// Source rank of every token row, forward by forward (in the order the forwards reached the
    /// group), row by row within a forward.
    pub source_ranks: Vec<u32>,
    /// The rank each (token, expert) pair was dispatched to (the replica chosen), rows ordered as
    /// `source_ranks`, `top_k` per row in the routing's order.
    pub served_ranks: Vec<u32>,
}

impl LayerTraffic {
    /// An empty record of model layer `layer` over `num_ranks` ranks.
    pub fn new(layer: usize, num_ranks: usize, top_k: usize, row_bytes: u64) -> Self {
        Self {
            layer,
            calls: 0,
            top_k,
            row_bytes,
            tokens_per_rank: vec![0; num_ranks],
            dispatch: DispatchMatrix::new(num_ranks),
            combine: DispatchMatrix::new(num_ranks),
            shared: DispatchMatrix::new(num_ranks),
            routing_by_rank: vec![Vec::new(); num_ranks],
            source_ranks: Vec::new(),
            served_ranks: Vec::new(),
        }
    }

    /// Tokens routed through the layer.
    pub fn tokens(&self) -> u64 {
        self.tokens_per_rank.iter().sum()
    }

    /// Routed dispatch bytes on links at the real shape.
    pub fn dispatch_remote_bytes(&self) -> u64 {
        self.dispatch.remote_bytes(self.row_bytes)
    }

    /// Routed combine bytes on links at the real shape.
    pub fn combine_remote_bytes(&self) -> u64 {
        self.combine.remote_bytes(self.row_bytes)
    }

    /// Folds another forward's record of the same layer into this one.
    pub(crate) fn accumulate(&mut self, other: &Self) {
        self.calls += other.calls;
        for (a, b) in self.tokens_per_rank.iter_mut().zip(&other.tokens_per_rank) {
            *a += b;
        }
        self.dispatch.accumulate(&other.dispatch);
        self.combine.accumulate(&other.combine);
        self.shared.accumulate(&other.shared);
        for (a, b) in self.routing_by_rank.iter_mut().zip(&other.routing_by_rank) {
            a.extend_from_slice(b);
        }
        self.source_ranks.extend_from_slice(&other.source_ranks);
        self.served_ranks.extend_from_slice(&other.served_ranks);
    }
}

/// The traffic of every MoE layer in one finished step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepTraffic {
    /// Steps finished before this one (0 for the first step).
    pub step: u64,
    /// One record per MoE layer of the model, in model order (the MTP layer last); layers that
    /// did not run have `calls == 0`.
    pub layers: Vec<LayerTraffic>,
}

impl StepTraffic {
    /// The record of model layer `layer`.
    pub fn layer(&self, layer: usize) -> Option<&LayerTraffic> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_messages_sit_on_the_diagonal_and_cost_no_link_bytes() {
        let mut m = DispatchMatrix::new(2);
        m.add(0, 0, 1, 3); // local: one row carrying three pairs
        m.add(0, 1, 1, 1);
        m.add(1, 0, 2, 2);
        assert_eq!(m.total_rows(), 4);
        assert_eq!(m.local_rows(), 1);
        assert_eq!(m.remote_rows(), 3);
        assert_eq!(m.remote_bytes(512), 3 * 512);
        assert_eq!(m.received_pairs(), vec![5, 1]);
        assert_eq!(m.sent_rows(), vec![2, 2]);
        assert_eq!(m.transpose().rows(0, 1), 2);
        assert_eq!(m.rows(5, 0), 0, "outside the group reads as zero");
    }
}
