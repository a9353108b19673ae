//! EPLB: DeepSeek's expert-parallel load balancer, from its published description.
//!
//! Given the expected load of each logical expert of a layer, EPLB decides how many physical
//! replicas each expert gets (hot experts get more) and which GPU holds each replica, so that the
//! busiest GPU's load (its dispatch receive load) is as low as the heuristics find. Two policies:
//!
//! - **Hierarchical** ([`EplbPolicy::Hierarchical`]), when the node count divides the expert-group
//!   count: (1) pack whole expert groups onto nodes, equal group counts per node, balancing node
//!   load; (2) within each node, replicate that node's experts into the node's physical slots;
//!   (3) pack the node's physical experts onto its GPUs, equal counts per GPU, balancing GPU
//!   load. Every replica of an expert, and every expert of a group, stays in one node, so
//!   group-limited (node-limited) routing keeps bounding a token's inter-node copies.
//! - **Global** ([`EplbPolicy::Global`]): replicate experts over all physical slots ignoring
//!   groups, then pack all physical experts onto all GPUs. The hierarchical steps with one group
//!   and one node.
//!
//! Step (2) uses [`replicate`], provably minimax-optimal for the load per replica; steps (1) and
//! (3) use [`pack_balanced`], a greedy heuristic (largest item to the lightest non-full bin).
//! Consequently EPLB does **not** guarantee a lower maximum GPU load than a given other layout: a
//! lucky contiguous layout can beat it (see `packing::tests`). What always holds: every logical
//! expert has at least one replica, every GPU holds exactly `num_physical / num_gpus` slots, the
//! total load is conserved, and the result is a pure function of its inputs.
//!
//! Physical slot `p` of a plan lives on GPU `p / (num_physical / num_gpus)`, as in
//! [`crate::ExpertPlacement`].

mod packing;

pub use packing::{pack_balanced, replicate};

use serde::{Deserialize, Serialize};

use crate::EpError;

/// Which of DeepSeek's two EPLB policies to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EplbPolicy {
    /// Groups to nodes, replicate within nodes, pack to GPUs; needs `num_nodes | num_groups`.
    Hierarchical,
    /// Replicate globally, pack to GPUs.
    Global,
}

impl EplbPolicy {
    /// Hierarchical when the node count divides the expert-group count, the groups divide the
    /// experts, and each node receives at least two groups (or there is a single node); global
    /// otherwise.
    ///
    /// The divisibility condition is DeepSeek's (`eplb.py` switches on it); its README adds that
    /// hierarchical suits prefill's *smaller* EP and global decode's larger EP. The two-groups
    /// condition makes "smaller" concrete: with one group per node, step (1) has nothing to
    /// choose (each node's load is its group's load) and node imbalance passes straight to the
    /// GPUs (see `docs/eplb.md`, EP64 rows). With DeepSeek-V3's 8 groups on 8-GPU nodes this gives
    /// hierarchical for EP8, EP16 and the EP32 prefill, global for EP64 and the EP144 decode.
    pub fn auto(params: &EplbParams, num_logical_experts: usize) -> Self {
        let node_has_choice = params.num_nodes == 1 || params.num_groups >= 2 * params.num_nodes;
        if Self::hierarchical_fits(params, num_logical_experts) && node_has_choice {
            Self::Hierarchical
        } else {
            Self::Global
        }
    }
}

impl EplbPolicy {
    /// Whether the hierarchical policy can run on this shape: the node count divides the group
    /// count and the GPU count, and the groups divide the experts.
    pub fn hierarchical_fits(params: &EplbParams, num_logical_experts: usize) -> bool {
        params.num_groups > 0
            && params.num_nodes > 0
            && params.num_groups.is_multiple_of(params.num_nodes)
            && params.num_gpus.is_multiple_of(params.num_nodes)
            && num_logical_experts.is_multiple_of(params.num_groups)
    }
}

/// The shape EPLB plans for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EplbParams {
    /// Physical expert slots per layer (logical + redundant); a multiple of `num_gpus`.
    pub num_physical_experts: usize,
    /// Expert groups of the model's group-limited routing (DeepSeek-V3 `n_group` = 8).
    pub num_groups: usize,
    /// Server nodes (the intra-node network is the fast one); divides `num_gpus`.
    pub num_nodes: usize,
    /// GPUs (EP ranks).
    pub num_gpus: usize,
}

/// EPLB's result for one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EplbPlan {
    /// Logical expert of each physical slot; slot `p` is on GPU `p / (slots / num_gpus)`.
    pub physical_to_logical: Vec<usize>,
    /// Physical slots of each logical expert, ascending.
    pub logical_to_physical: Vec<Vec<usize>>,
    /// Replica count of each logical expert (`logical_to_physical[e].len()`).
    pub replica_counts: Vec<usize>,
}

impl EplbPlan {
    fn from_map(physical_to_logical: Vec<usize>, num_logical: usize) -> Self {
        let mut logical_to_physical = vec![Vec::new(); num_logical];
        for (p, &e) in physical_to_logical.iter().enumerate() {
            logical_to_physical[e].push(p);
        }
        let replica_counts = logical_to_physical.iter().map(Vec::len).collect();
        Self {
            physical_to_logical,
            logical_to_physical,
            replica_counts,
        }
    }
}

/// Runs EPLB on every layer of `load` (`load[layer][logical expert]`).
pub fn rebalance_experts(
    load: &[Vec<f64>],
    params: &EplbParams,
    policy: EplbPolicy,
) -> Result<Vec<EplbPlan>, EpError> {
    load.iter()
        .enumerate()
        .map(|(layer, row)| {
            rebalance_layer(row, params, policy).map_err(|e| match e {
                EpError::InvalidField { field, reason } if field.starts_with("load") => {
                    EpError::field(format!("load[{layer}]{}", &field[4..]), reason)
                }
                other => other,
            })
        })
        .collect()
}

/// Runs EPLB on one layer's per-logical-expert load.
pub fn rebalance_layer(
    load: &[f64],
    params: &EplbParams,
    policy: EplbPolicy,
) -> Result<EplbPlan, EpError> {
    check_load(load)?;
    let plan = match policy {
        EplbPolicy::Hierarchical => hierarchical(load, params)?,
        EplbPolicy::Global => hierarchical(
            load,
            &EplbParams {
                num_groups: 1,
                num_nodes: 1,
                ..*params
            },
        )?,
    };
    Ok(plan)
}

fn check_load(load: &[f64]) -> Result<(), EpError> {
    if load.is_empty() {
        return Err(EpError::field("load", "has no experts"));
    }
    if let Some(e) = load.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(EpError::field(
            format!("load[{e}]"),
            format!("{} is not a finite non-negative load", load[e]),
        ));
    }
    Ok(())
}

fn check_divides(field: &str, divisor: usize, what: &str, value: usize) -> Result<(), EpError> {
    if divisor == 0 || !value.is_multiple_of(divisor) {
        return Err(EpError::field(
            field,
            format!("{divisor} does not divide {what} = {value}"),
        ));
    }
    Ok(())
}

/// The three hierarchical steps; the global policy is this with one group and one node.
fn hierarchical(load: &[f64], params: &EplbParams) -> Result<EplbPlan, EpError> {
    let num_logical = load.len();
    let EplbParams {
        num_physical_experts: num_physical,
        num_groups,
        num_nodes,
        num_gpus,
    } = *params;
    check_divides(
        "eplb.num_groups",
        num_groups,
        "the logical expert count",
        num_logical,
    )?;
    check_divides("eplb.num_nodes", num_nodes, "num_groups", num_groups)?;
    check_divides("eplb.num_nodes", num_nodes, "num_gpus", num_gpus)?;
    check_divides(
        "eplb.num_gpus",
        num_gpus,
        "num_physical_experts",
        num_physical,
    )?;
    if num_physical < num_logical {
        return Err(EpError::field(
            "eplb.num_physical_experts",
            format!("{num_physical} slots cannot hold {num_logical} logical experts"),
        ));
    }
    let group_size = num_logical / num_groups;
    let groups_per_node = num_groups / num_nodes;
    let logical_per_node = num_logical / num_nodes;
    let physical_per_node = num_physical / num_nodes;
    let gpus_per_node = num_gpus / num_nodes;
    let slots_per_gpu = num_physical / num_gpus;

    // Step 1: whole groups onto nodes. A group's experts get consecutive "node-major" ids:
    // node n's experts are node-major ids n * logical_per_node ..
    let group_load: Vec<f64> = load.chunks(group_size).map(|g| g.iter().sum()).collect();
    let group_slots = pack_balanced(&group_load, num_nodes)?;
    let mut logical_of_node_major = vec![0; num_logical];
    for (group, &(node, position)) in group_slots.iter().enumerate() {
        let first = (node * groups_per_node + position) * group_size;
        for j in 0..group_size {
            logical_of_node_major[first + j] = group * group_size + j;
        }
    }

    let mut physical_to_logical = vec![0; num_physical];
    for node in 0..num_nodes {
        let experts = &logical_of_node_major[node * logical_per_node..][..logical_per_node];
        let node_load: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
        // Step 2: replicate the node's experts into its slots.
        let (slot_to_local, counts) = replicate(&node_load, physical_per_node)?;
        // Step 3: pack the node's physical experts onto its GPUs.
        let replica_load: Vec<f64> = slot_to_local
            .iter()
            .map(|&i| node_load[i] / counts[i] as f64)
            .collect();
        let gpu_slots = pack_balanced(&replica_load, gpus_per_node)?;
        for (replica, &(gpu, position)) in gpu_slots.iter().enumerate() {
            let slot = node * physical_per_node + gpu * slots_per_gpu + position;
            physical_to_logical[slot] = experts[slot_to_local[replica]];
        }
    }
    Ok(EplbPlan::from_map(physical_to_logical, num_logical))
}

#[cfg(test)]
mod tests;
