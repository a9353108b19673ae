//! A layer's routing: for each DP rank (GPU) and each of its tokens, the routed experts chosen.
//!
//! Tokens are numbered per rank in the batch's order (requests in order, each request's new tokens
//! consecutively). The shared expert is not listed: every token uses it, on its own GPU.
//!
//! A routing may also name the GPU that serves each (token, expert) copy
//! ([`LayerRouting::with_gpus`]: an EP runtime's recorded dispatch); the traffic plan then sends
//! every copy there instead of choosing among the expert's replicas.
//!
//! Invariant (checked by [`LayerRouting::new`]): `experts.len() == top_k × Σ tokens_per_rank`, and
//! the serving GPUs, when given, are as many as the expert ids.

use crate::error::FabricError;

/// The most routed experts a token may choose.
pub const MAX_TOP_K: usize = 64;

/// Token → routed expert ids, for one MoE layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRouting {
    top_k: usize,
    /// `offsets[r]..offsets[r + 1]` are rank `r`'s tokens.
    offsets: Vec<usize>,
    experts: Vec<u16>,
    /// The GPU serving each copy, parallel to `experts` ([`LayerRouting::with_gpus`]).
    gpus: Option<Vec<u32>>,
}

impl LayerRouting {
    /// A [`LayerRouting::with_gpus`] entry that leaves its copy to the traffic plan's replica rule.
    pub const ANY_GPU: u32 = u32::MAX;

    /// Routing of `tokens_per_rank[r]` tokens on each rank, `top_k` expert ids per token, flattened
    /// rank by rank and token by token.
    pub fn new(
        top_k: usize,
        tokens_per_rank: &[u32],
        experts: Vec<u16>,
    ) -> Result<Self, FabricError> {
        if top_k == 0 || top_k > MAX_TOP_K {
            return Err(FabricError::invalid(
                "routing",
                "top_k",
                format!("must be in 1..={MAX_TOP_K}, got {top_k}"),
            ));
        }
        let mut offsets = Vec::with_capacity(tokens_per_rank.len() + 1);
        offsets.push(0usize);
        for &t in tokens_per_rank {
            let last = offsets.last().copied().unwrap_or(0);
            offsets.push(last + t as usize);
        }
        let tokens = offsets.last().copied().unwrap_or(0);
        if experts.len() != tokens * top_k {
            return Err(FabricError::invalid(
                "routing",
                "experts",
                format!(
                    "has {} ids for {tokens} tokens × top_k {top_k}",
                    experts.len()
                ),
            ));
        }
        Ok(Self {
            top_k,
            offsets,
            experts,
            gpus: None,
        })
    }

    /// The same routing with the GPU that serves each (token, expert) copy, flattened like the
    /// expert ids: the traffic plan sends every copy to its GPU instead of choosing among the
    /// expert's replicas (an error naming the token when that GPU holds no copy of the expert);
    /// an entry [`LayerRouting::ANY_GPU`] leaves its copy to the plan's rule.
    pub fn with_gpus(mut self, gpus: Vec<u32>) -> Result<Self, FabricError> {
        if gpus.len() != self.experts.len() {
            return Err(FabricError::invalid(
                "routing",
                "gpus",
                format!(
                    "has {} serving GPUs for {} expert ids",
                    gpus.len(),
                    self.experts.len()
                ),
            ));
        }
        self.gpus = Some(gpus);
        Ok(self)
    }

    /// The serving GPUs of rank `rank`'s tokens `tokens`, flattened like
    /// [`LayerRouting::experts_of`], when the routing names them.
    pub fn gpus_of(&self, rank: usize, tokens: std::ops::Range<usize>) -> Option<&[u32]> {
        let gpus = self.gpus.as_deref()?;
        let base = *self.offsets.get(rank)?;
        gpus.get((base + tokens.start) * self.top_k..(base + tokens.end) * self.top_k)
    }

    /// Routed experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// DP ranks covered.
    pub fn num_ranks(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Tokens of rank `rank` (0 for an unknown rank).
    pub fn tokens_of(&self, rank: usize) -> usize {
        match (self.offsets.get(rank), self.offsets.get(rank + 1)) {
            (Some(a), Some(b)) => b - a,
            _ => 0,
        }
    }

    /// Tokens over all ranks.
    pub fn total_tokens(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// The expert ids of rank `rank`'s tokens `tokens`, flattened (`top_k` per token).
    pub fn experts_of(&self, rank: usize, tokens: std::ops::Range<usize>) -> &[u16] {
        let Some(&base) = self.offsets.get(rank) else {
            return &[];
        };
        let lo = (base + tokens.start) * self.top_k;
        let hi = (base + tokens.end) * self.top_k;
        self.experts.get(lo..hi).unwrap_or(&[])
    }

    /// Checks expert ids against `n_experts` and distinctness within a token; `origin` names this
    /// layer (`routing[3]`).
    pub fn validate(&self, n_experts: usize, origin: &str) -> Result<(), FabricError> {
        for r in 0..self.num_ranks() {
            let ids = self.experts_of(r, 0..self.tokens_of(r));
            for (t, chosen) in ids.chunks(self.top_k).enumerate() {
                for (j, &e) in chosen.iter().enumerate() {
                    if usize::from(e) >= n_experts {
                        return Err(FabricError::invalid(
                            origin,
                            format!("rank {r} token {t} expert {j}"),
                            format!("is expert {e} but the placement has {n_experts} experts"),
                        ));
                    }
                    if chosen[..j].contains(&e) {
                        return Err(FabricError::invalid(
                            origin,
                            format!("rank {r} token {t} expert {j}"),
                            format!("chooses expert {e} twice"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_addressed_per_rank() {
        let r = LayerRouting::new(2, &[1, 2], vec![0, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(r.num_ranks(), 2);
        assert_eq!(r.experts_of(1, 1..2), &[4, 5]);
        assert_eq!(r.total_tokens(), 3);
    }

    #[test]
    fn a_length_mismatch_is_an_error() {
        assert!(LayerRouting::new(2, &[2], vec![0, 1, 2]).is_err());
    }

    #[test]
    fn an_unknown_expert_is_an_error_naming_the_token() {
        let r = LayerRouting::new(2, &[1], vec![0, 300]).unwrap();
        let err = r.validate(256, "routing[0]").unwrap_err().to_string();
        assert!(
            err.contains("routing[0]") && err.contains("rank 0 token 0"),
            "{err}"
        );
    }
}
