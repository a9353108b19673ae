//! Topology: which GPU sits in which node, NVLink domain, network plane and leaf switch, and the
//! links each GPU owns.
//!
//! GPU `g` (also DP/EP rank `g`) is GPU `g % domain_gpus` of NVLink domain `g / domain_gpus` and
//! GPU `g % gpus_per_node` of node `g / gpus_per_node`. Each GPU owns four link directions: NIC
//! transmit and receive (scale-out) and NVLink transmit and receive (scale-up). The switches are
//! assumed non-blocking (a fat tree), so a transfer only contends at its endpoints' links.
//!
//! Invariant: the GPU count is either at most one NVLink domain or a whole number of domains, so
//! every GPU has a same-index peer in every other domain (the DeepEP forwarding target).

use serde::Serialize;

use crate::error::FabricError;
use crate::profile::HardwareProfile;

/// The class of a link direction; with a GPU index it names one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkClass {
    /// NIC, transmit.
    NicTx,
    /// NIC, receive.
    NicRx,
    /// NVLink, transmit.
    NvlinkTx,
    /// NVLink, receive.
    NvlinkRx,
}

impl LinkClass {
    /// All classes in track order.
    pub const ALL: [LinkClass; 4] = [
        LinkClass::NicTx,
        LinkClass::NicRx,
        LinkClass::NvlinkTx,
        LinkClass::NvlinkRx,
    ];

    /// Short label for traces.
    pub fn label(self) -> &'static str {
        match self {
            LinkClass::NicTx => "nic-tx",
            LinkClass::NicRx => "nic-rx",
            LinkClass::NvlinkTx => "nvlink-tx",
            LinkClass::NvlinkRx => "nvlink-rx",
        }
    }
}

/// The modeled cluster for one EP group.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    num_gpus: u32,
    gpus_per_node: u32,
    domain_gpus: u32,
    planes: u32,
    /// Per GPU: NVLink domain, index in it, leaf switch group, plane (hot-path tables).
    domain: Vec<u32>,
    index: Vec<u32>,
    leaf: Vec<u32>,
    plane: Vec<u32>,
    same_leaf_us: f64,
    cross_leaf_us: f64,
    nvlink_us: f64,
}

impl Topology {
    /// The most GPUs an EP group may have (traffic plans index GPUs with 16 bits).
    pub const MAX_GPUS: u32 = 1 << 16;

    /// The EP group of `num_gpus` GPUs on `profile`'s hardware.
    pub fn new(profile: &HardwareProfile, num_gpus: u32) -> Result<Self, FabricError> {
        let domain = profile.scale_up.domain_gpus;
        if num_gpus == 0 || num_gpus > Self::MAX_GPUS {
            return Err(FabricError::invalid(
                "topology",
                "ep_size",
                format!("must be in 1..={}, got {num_gpus}", Self::MAX_GPUS),
            ));
        }
        if num_gpus > domain && !num_gpus.is_multiple_of(domain) {
            return Err(FabricError::invalid(
                "topology",
                "ep_size",
                format!(
                    "{num_gpus} GPUs is not a whole number of {}-GPU NVLink domains of profile `{}`",
                    domain, profile.name
                ),
            ));
        }
        let gpus_per_node = profile.node.gpus_per_node.min(num_gpus);
        let domain_gpus = domain.min(num_gpus);
        let planes = profile.scale_out.planes;
        let nodes_per_leaf = profile.scale_out.nodes_per_leaf;
        let gpus = 0..num_gpus;
        Ok(Self {
            num_gpus,
            gpus_per_node,
            domain_gpus,
            planes,
            domain: gpus.clone().map(|g| g / domain_gpus).collect(),
            index: gpus.clone().map(|g| g % domain_gpus).collect(),
            leaf: gpus
                .clone()
                .map(|g| g / gpus_per_node / nodes_per_leaf)
                .collect(),
            plane: gpus.map(|g| (g % gpus_per_node) % planes).collect(),
            same_leaf_us: profile.scale_out.latency_same_leaf_us,
            cross_leaf_us: profile.scale_out.latency_cross_leaf_us,
            nvlink_us: profile.scale_up.latency_us,
        })
    }

    /// GPUs in the EP group.
    pub fn num_gpus(&self) -> u32 {
        self.num_gpus
    }

    /// GPUs per host (for per-node figures).
    pub fn gpus_per_node(&self) -> u32 {
        self.gpus_per_node
    }

    /// GPUs per NVLink domain.
    pub fn domain_gpus(&self) -> u32 {
        self.domain_gpus
    }

    /// NVLink domains in the group.
    pub fn num_domains(&self) -> u32 {
        self.num_gpus.div_ceil(self.domain_gpus)
    }

    /// Hosts in the group.
    pub fn num_nodes(&self) -> u32 {
        self.num_gpus.div_ceil(self.gpus_per_node)
    }

    /// The NVLink domain of `gpu`.
    pub fn domain_of(&self, gpu: u32) -> u32 {
        self.domain
            .get(gpu as usize)
            .copied()
            .unwrap_or(gpu / self.domain_gpus)
    }

    /// The host of `gpu`.
    pub fn node_of(&self, gpu: u32) -> u32 {
        gpu / self.gpus_per_node
    }

    /// The index of `gpu` inside its NVLink domain.
    pub fn index_in_domain(&self, gpu: u32) -> u32 {
        self.index
            .get(gpu as usize)
            .copied()
            .unwrap_or(gpu % self.domain_gpus)
    }

    /// The network plane of `gpu`'s NIC.
    pub fn plane_of(&self, gpu: u32) -> u32 {
        (gpu % self.gpus_per_node) % self.planes
    }

    /// Per-GPU NVLink domains (index = GPU).
    pub fn domains(&self) -> &[u32] {
        &self.domain
    }

    /// Per-GPU indices inside their NVLink domain (index = GPU).
    pub fn indices_in_domain(&self) -> &[u32] {
        &self.index
    }

    /// One NVLink hop's latency, µs.
    pub fn nvlink_latency_us(&self) -> f64 {
        self.nvlink_us
    }

    /// DeepEP's forwarding target: the GPU with `src`'s in-domain index in domain `domain`.
    pub fn forwarder(&self, src: u32, domain: u32) -> u32 {
        domain * self.domain_gpus + self.index_in_domain(src)
    }

    /// Latency of one NIC-to-NIC transfer from `a` to `b`: same or cross leaf, plus one NVLink
    /// hop when the two NICs are on different planes (forwarded inside the node).
    pub fn nic_latency_us(&self, a: u32, b: u32) -> f64 {
        self.nic_latencies_us()[self.nic_latency_class(a, b)]
    }

    /// The four NIC latencies, µs, that [`Topology::nic_latency_class`] indexes: same leaf, cross
    /// leaf, and each plus one NVLink hop (different planes).
    pub fn nic_latencies_us(&self) -> [f64; 4] {
        [
            self.same_leaf_us,
            self.cross_leaf_us,
            self.same_leaf_us + self.nvlink_us,
            self.cross_leaf_us + self.nvlink_us,
        ]
    }

    /// The class of a NIC transfer from `a` to `b`: +1 across leaves, +2 across planes (an
    /// unknown GPU counts as both).
    pub fn nic_latency_class(&self, a: u32, b: u32) -> usize {
        let (a, b) = (a as usize, b as usize);
        let (Some(&la), Some(&lb), Some(&pa), Some(&pb)) = (
            self.leaf.get(a),
            self.leaf.get(b),
            self.plane.get(a),
            self.plane.get(b),
        ) else {
            return 3;
        };
        usize::from(la != lb) + 2 * usize::from(pa != pb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h800() -> HardwareProfile {
        HardwareProfile::builtin("h800").unwrap()
    }

    #[test]
    fn ep144_on_h800_has_18_nodes_and_same_index_forwarders() {
        let t = Topology::new(&h800(), 144).unwrap();
        assert_eq!(t.num_domains(), 18);
        assert_eq!(t.num_nodes(), 18);
        assert_eq!(t.forwarder(13, 7), 7 * 8 + 5);
    }

    #[test]
    fn gb200_puts_72_gpus_in_one_domain_of_18_trays() {
        let gb = HardwareProfile::builtin("gb200-nvl72").unwrap();
        let t = Topology::new(&gb, 72).unwrap();
        assert_eq!(t.num_domains(), 1);
        assert_eq!(t.num_nodes(), 18);
    }

    #[test]
    fn a_partial_domain_count_is_an_error_naming_ep_size() {
        let err = Topology::new(&h800(), 100).unwrap_err().to_string();
        assert!(err.contains("ep_size"), "{err}");
        assert!(Topology::new(&h800(), 0).is_err());
        let err = Topology::new(&h800(), (1 << 16) + 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ep_size") && err.contains("65536"), "{err}");
    }

    #[test]
    fn nic_latency_distinguishes_leaf_and_plane() {
        let p = h800();
        let t = Topology::new(&p, 320).unwrap();
        assert_eq!(t.nic_latency_us(0, 8), 2.8);
        assert_eq!(t.nic_latency_us(0, 32 * 8), 3.7);
        assert!((t.nic_latency_us(0, 9) - (2.8 + 3.33)).abs() < 1e-12);
    }
}
