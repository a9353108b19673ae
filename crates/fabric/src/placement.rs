//! Expert placement: which GPUs hold a copy of each routed expert.
//!
//! Expert `e`'s copies are `replicas[e]` (GPU indices, the first is the primary). Every GPU also
//! holds the shared expert(s) and the attention weights (DP attention), which are not listed here.
//!
//! Invariants (checked by [`ExpertPlacement::new`]): every expert has at least one copy, every GPU
//! index is below `num_gpus`, and an expert has at most one copy per GPU.

use crate::error::FabricError;

/// Expert → GPU(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    num_gpus: u32,
    replicas: Vec<Vec<u32>>,
}

impl ExpertPlacement {
    /// A placement from explicit copies; errors name `placement.replicas[e]`.
    pub fn new(num_gpus: u32, replicas: Vec<Vec<u32>>) -> Result<Self, FabricError> {
        if num_gpus == 0 {
            return Err(FabricError::invalid(
                "placement",
                "num_gpus",
                "must be at least 1",
            ));
        }
        if replicas.is_empty() || replicas.len() > usize::from(u16::MAX) {
            return Err(FabricError::invalid(
                "placement",
                "replicas",
                format!("must list 1..=65535 experts, got {}", replicas.len()),
            ));
        }
        for (e, gpus) in replicas.iter().enumerate() {
            if gpus.is_empty() {
                return Err(FabricError::invalid(
                    "placement",
                    format!("replicas[{e}]"),
                    format!("expert {e} is placed on no GPU"),
                ));
            }
            for (j, &g) in gpus.iter().enumerate() {
                if g >= num_gpus {
                    return Err(FabricError::invalid(
                        "placement",
                        format!("replicas[{e}][{j}]"),
                        format!("names GPU {g} but the EP group has {num_gpus} GPUs"),
                    ));
                }
                if gpus[..j].contains(&g) {
                    return Err(FabricError::invalid(
                        "placement",
                        format!("replicas[{e}][{j}]"),
                        format!("places expert {e} on GPU {g} twice"),
                    ));
                }
            }
        }
        Ok(Self { num_gpus, replicas })
    }

    /// Contiguous blocks: expert `e` on GPU `⌊e · num_gpus / n_experts⌋` (so each expert group of a
    /// group-limited router lands on as few nodes as possible); with more GPUs than experts, expert
    /// `e` on GPU `e` and the remaining GPUs empty until [`ExpertPlacement::with_redundant`].
    pub fn contiguous(n_experts: u32, num_gpus: u32) -> Result<Self, FabricError> {
        if n_experts == 0 {
            return Err(FabricError::invalid(
                "placement",
                "n_experts",
                "must be at least 1",
            ));
        }
        let replicas = (0..n_experts)
            .map(|e| {
                let g = if num_gpus <= n_experts {
                    (u64::from(e) * u64::from(num_gpus) / u64::from(n_experts)) as u32
                } else {
                    e
                };
                vec![g]
            })
            .collect();
        Self::new(num_gpus, replicas)
    }

    /// Adds `n_redundant` copies. Experts are chosen by descending `loads` (ties: lower id), or
    /// evenly spaced when `loads` is `None`; each copy goes to the GPU with the fewest expert slots
    /// that does not hold that expert yet (ties: the lowest GPU index).
    pub fn with_redundant(
        mut self,
        n_redundant: u32,
        loads: Option<&[f64]>,
    ) -> Result<Self, FabricError> {
        let n = self.replicas.len();
        if let Some(l) = loads
            && l.len() != n
        {
            return Err(FabricError::invalid(
                "placement",
                "loads",
                format!("has {} entries for {n} experts", l.len()),
            ));
        }
        let mut slots = self.slots_per_gpu();
        let mut by_load: Vec<usize> = (0..n).collect();
        if let Some(l) = loads {
            by_load.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        }
        for i in 0..n_redundant as usize {
            let expert = match loads {
                Some(_) => by_load[i % n],
                None => (i * n / (n_redundant as usize).max(1)) % n,
            };
            let target = (0..self.num_gpus)
                .filter(|g| !self.replicas[expert].contains(g))
                .min_by_key(|&g| (slots[g as usize], g));
            let Some(g) = target else {
                return Err(FabricError::invalid(
                    "placement",
                    "redundant_experts",
                    format!("expert {expert} already has a copy on every GPU"),
                ));
            };
            self.replicas[expert].push(g);
            slots[g as usize] += 1;
        }
        Ok(self)
    }

    /// GPUs in the EP group.
    pub fn num_gpus(&self) -> u32 {
        self.num_gpus
    }

    /// Logical routed experts.
    pub fn num_experts(&self) -> usize {
        self.replicas.len()
    }

    /// The GPUs holding expert `expert` (primary first); empty for an unknown expert.
    pub fn gpus_of(&self, expert: usize) -> &[u32] {
        self.replicas.get(expert).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Expert copies per GPU.
    pub fn slots_per_gpu(&self) -> Vec<u32> {
        let mut slots = vec![0u32; self.num_gpus as usize];
        for gpus in &self.replicas {
            for &g in gpus {
                slots[g as usize] += 1;
            }
        }
        slots
    }

    /// Total expert copies (logical experts plus redundant copies).
    pub fn total_slots(&self) -> usize {
        self.replicas.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ep144_with_32_redundant_gives_two_experts_per_gpu() {
        let p = ExpertPlacement::contiguous(256, 144)
            .unwrap()
            .with_redundant(32, None)
            .unwrap();
        assert!(p.slots_per_gpu().iter().all(|&s| s == 2));
        assert_eq!(p.total_slots(), 288);
    }

    #[test]
    fn ep320_fills_the_empty_gpus_with_redundant_copies() {
        let p = ExpertPlacement::contiguous(256, 320)
            .unwrap()
            .with_redundant(64, None)
            .unwrap();
        assert!(p.slots_per_gpu().iter().all(|&s| s == 1));
    }

    #[test]
    fn ep64_keeps_each_group_of_32_on_one_node() {
        let p = ExpertPlacement::contiguous(256, 64).unwrap();
        for e in 0..256 {
            assert_eq!(p.gpus_of(e)[0] / 8, e as u32 / 32);
        }
    }

    #[test]
    fn an_expert_on_no_gpu_is_an_error_naming_it() {
        let err = ExpertPlacement::new(8, vec![vec![0], vec![]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("replicas[1]") && err.contains("no GPU"),
            "{err}"
        );
    }

    #[test]
    fn a_gpu_outside_the_group_is_an_error_naming_it() {
        let err = ExpertPlacement::new(8, vec![vec![0], vec![9]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("replicas[1][0]") && err.contains("GPU 9"),
            "{err}"
        );
    }

    #[test]
    fn redundant_copies_follow_the_load() {
        let loads: Vec<f64> = (0..16).map(|e| if e == 5 { 10.0 } else { 1.0 }).collect();
        let p = ExpertPlacement::contiguous(16, 4)
            .unwrap()
            .with_redundant(1, Some(&loads))
            .unwrap();
        assert_eq!(p.gpus_of(5).len(), 2);
    }
}
