//! Hardware profiles: what one GPU, one node, the scale-up domain and the scale-out network can do.
//!
//! Profiles are TOML documents (`config/hardware/*.toml`), embedded in the binary by name
//! ([`HardwareProfile::builtin`]) and loadable from a user's file ([`HardwareProfile::load`] takes a
//! name or a path). Every field is required except `[efficiency]`, unknown keys are rejected, and
//! [`HardwareProfile::validate`] rejects zero, negative or non-finite rates naming the field.
//!
//! Invariant: a `HardwareProfile` obtained from this module's constructors is valid.

use serde::{Deserialize, Serialize};

use crate::error::{FabricError, require_non_negative, require_positive};
use crate::named;

/// The profiles shipped with pdserve: (name, TOML text).
const BUILTIN: &[(&str, &str)] = &[
    ("h800", include_str!("../../../config/hardware/h800.toml")),
    ("h100", include_str!("../../../config/hardware/h100.toml")),
    (
        "gb200-nvl72",
        include_str!("../../../config/hardware/gb200-nvl72.toml"),
    ),
];

/// A modeled cluster's hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// Short name (`h800`); the CLI's `--hardware` value for built-in profiles.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// One GPU.
    pub gpu: GpuSpec,
    /// One host.
    pub node: NodeSpec,
    /// The NVLink (scale-up) domain.
    pub scale_up: ScaleUpSpec,
    /// The NIC (scale-out) network.
    pub scale_out: ScaleOutSpec,
    /// Achieved fractions of the peaks; calibratable.
    #[serde(default)]
    pub efficiency: Efficiency,
}

/// Compute and memory of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Dense BF16 tensor-core peak, FLOP/s.
    pub bf16_flops_per_s: f64,
    /// Dense FP8 tensor-core peak, FLOP/s.
    pub fp8_flops_per_s: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// HBM capacity, bytes; a placement whose weights exceed it is refused.
    pub hbm_capacity_bytes: f64,
    /// Streaming multiprocessors; communication SMs are taken from this count.
    pub sm_count: u32,
}

/// One host (chassis or tray).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// GPUs per host; used for per-node throughput.
    pub gpus_per_node: u32,
}

/// The NVLink domain: GPUs that reach each other without a NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleUpSpec {
    /// GPUs in one NVLink domain (a multiple of `node.gpus_per_node`).
    pub domain_gpus: u32,
    /// Nominal NVLink bandwidth per GPU and direction, bytes/s (the `analysis` mode uses it).
    pub unidirectional_bytes_per_s: f64,
    /// Achievable NVLink bandwidth per GPU and direction, bytes/s (the `detailed` mode uses it).
    pub effective_bytes_per_s: f64,
    /// One NVLink hop's latency, µs.
    pub latency_us: f64,
}

/// The NIC network between NVLink domains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleOutSpec {
    /// Nominal NIC bandwidth per GPU and direction, bytes/s (the `analysis` mode uses it).
    pub nic_bytes_per_s: f64,
    /// Achievable NIC bandwidth per GPU and direction, bytes/s (the `detailed` mode uses it).
    pub effective_bytes_per_s: f64,
    /// Latency between two NICs under one leaf switch, µs.
    pub latency_same_leaf_us: f64,
    /// Latency between NICs under different leaf switches, µs.
    pub latency_cross_leaf_us: f64,
    /// Network planes; GPU `i` of a node uses plane `i % planes`. Traffic between planes is
    /// forwarded inside the node and pays one extra NVLink latency.
    pub planes: u32,
    /// Nodes whose NICs of one plane share a leaf switch.
    pub nodes_per_leaf: u32,
}

/// Achieved fractions of the profile's peaks and fixed costs: the calibration knobs of the cost
/// model. Defaults are the Hopper factors of the `h800` profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Efficiency {
    /// Fraction of `fp8_flops_per_s` reached by FP8 GEMMs (DeepGEMM 1350/1979 on Hopper).
    pub gemm_fp8: f64,
    /// Fraction of `bf16_flops_per_s` reached by core attention (FlashMLA 660/989 on H800).
    pub attention_bf16: f64,
    /// Fraction of `hbm_bytes_per_s` reached by memory-bound kernels (FlashMLA 3000/3350).
    pub memory: f64,
    /// Fixed time added to every compute stage, µs.
    pub stage_overhead_us: f64,
    /// SMs given to communication during prefill (DeepSeek: 24); compute FLOP/s scale by
    /// `(sm_count - prefill_comm_sms) / sm_count`.
    pub prefill_comm_sms: u32,
    /// SMs given to communication during decode (DeepSeek: 0, all-to-all through NIC RDMA).
    pub decode_comm_sms: u32,
}

impl Default for Efficiency {
    fn default() -> Self {
        Self {
            gemm_fp8: 0.682,
            attention_bf16: 0.667,
            memory: 0.896,
            stage_overhead_us: 0.0,
            prefill_comm_sms: 24,
            decode_comm_sms: 0,
        }
    }
}

impl HardwareProfile {
    /// Names of the built-in profiles.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(name, _)| *name).collect()
    }

    /// A built-in profile by name.
    pub fn builtin(name: &str) -> Result<Self, FabricError> {
        Self::from_toml_str(
            named::builtin_text("hardware profile", BUILTIN, name)?,
            name,
        )
    }

    /// A built-in profile by name, or else the TOML file at that path.
    pub fn load(name_or_path: &str) -> Result<Self, FabricError> {
        Self::from_toml_str(
            &named::builtin_or_file("hardware profile", BUILTIN, name_or_path)?,
            name_or_path,
        )
    }

    /// Parses and validates a profile; `origin` names the document in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, FabricError> {
        let profile: Self = toml::from_str(text).map_err(|e| FabricError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        profile.validate(origin)?;
        Ok(profile)
    }

    /// Checks every field; the error names the first field at fault.
    pub fn validate(&self, origin: &str) -> Result<(), FabricError> {
        let g = &self.gpu;
        require_positive(origin, "gpu.bf16_flops_per_s", g.bf16_flops_per_s)?;
        require_positive(origin, "gpu.fp8_flops_per_s", g.fp8_flops_per_s)?;
        require_positive(origin, "gpu.hbm_bytes_per_s", g.hbm_bytes_per_s)?;
        require_positive(origin, "gpu.hbm_capacity_bytes", g.hbm_capacity_bytes)?;
        require_count(origin, "gpu.sm_count", g.sm_count)?;
        require_count(origin, "node.gpus_per_node", self.node.gpus_per_node)?;
        let up = &self.scale_up;
        require_count(origin, "scale_up.domain_gpus", up.domain_gpus)?;
        if !up.domain_gpus.is_multiple_of(self.node.gpus_per_node) {
            return Err(FabricError::invalid(
                origin,
                "scale_up.domain_gpus",
                format!(
                    "must be a multiple of node.gpus_per_node ({}), got {}",
                    self.node.gpus_per_node, up.domain_gpus
                ),
            ));
        }
        require_positive(
            origin,
            "scale_up.unidirectional_bytes_per_s",
            up.unidirectional_bytes_per_s,
        )?;
        require_positive(
            origin,
            "scale_up.effective_bytes_per_s",
            up.effective_bytes_per_s,
        )?;
        require_non_negative(origin, "scale_up.latency_us", up.latency_us)?;
        let out = &self.scale_out;
        require_positive(origin, "scale_out.nic_bytes_per_s", out.nic_bytes_per_s)?;
        require_positive(
            origin,
            "scale_out.effective_bytes_per_s",
            out.effective_bytes_per_s,
        )?;
        require_non_negative(
            origin,
            "scale_out.latency_same_leaf_us",
            out.latency_same_leaf_us,
        )?;
        require_non_negative(
            origin,
            "scale_out.latency_cross_leaf_us",
            out.latency_cross_leaf_us,
        )?;
        require_count(origin, "scale_out.planes", out.planes)?;
        require_count(origin, "scale_out.nodes_per_leaf", out.nodes_per_leaf)?;
        self.efficiency.validate(origin, g.sm_count)
    }

    /// The bandwidth the paper's analysis charges EP traffic at: the scale-up link when the
    /// profile's NVLink domain spans several hosts (GB200 NVL72), else the NIC.
    pub fn analysis_link(&self) -> AnalysisLink {
        if self.scale_up.domain_gpus > self.node.gpus_per_node {
            AnalysisLink::ScaleUp
        } else {
            AnalysisLink::ScaleOut
        }
    }
}

/// Which link carries EP traffic in the paper's analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnalysisLink {
    /// The NIC (`scale_out.nic_bytes_per_s`).
    ScaleOut,
    /// NVLink (`scale_up.unidirectional_bytes_per_s`).
    ScaleUp,
}

impl Efficiency {
    /// Checks every factor; `sm_count` bounds the communication SMs.
    pub fn validate(&self, origin: &str, sm_count: u32) -> Result<(), FabricError> {
        for (field, value) in [
            ("efficiency.gemm_fp8", self.gemm_fp8),
            ("efficiency.attention_bf16", self.attention_bf16),
            ("efficiency.memory", self.memory),
        ] {
            require_positive(origin, field, value)?;
            if value > 1.0 {
                return Err(FabricError::invalid(
                    origin,
                    field,
                    format!("is a fraction of the peak and must be at most 1, got {value}"),
                ));
            }
        }
        require_non_negative(
            origin,
            "efficiency.stage_overhead_us",
            self.stage_overhead_us,
        )?;
        for (field, sms) in [
            ("efficiency.prefill_comm_sms", self.prefill_comm_sms),
            ("efficiency.decode_comm_sms", self.decode_comm_sms),
        ] {
            if sms >= sm_count {
                return Err(FabricError::invalid(
                    origin,
                    field,
                    format!("must leave SMs for compute: {sms} of gpu.sm_count {sm_count}"),
                ));
            }
        }
        Ok(())
    }
}

fn require_count(origin: &str, field: &str, value: u32) -> Result<(), FabricError> {
    if value == 0 {
        Err(FabricError::invalid(
            origin,
            field,
            "must be at least 1, got 0",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_validates() {
        for name in HardwareProfile::builtin_names() {
            let p = HardwareProfile::builtin(name).unwrap();
            assert_eq!(p.name, name);
        }
    }

    #[test]
    fn h800_profile_carries_the_papers_numbers() {
        let p = HardwareProfile::builtin("h800").unwrap();
        assert_eq!(p.node.gpus_per_node, 8);
        assert_eq!(p.scale_up.unidirectional_bytes_per_s, 200e9);
        assert_eq!(p.scale_up.effective_bytes_per_s, 160e9);
        assert_eq!(p.scale_out.nic_bytes_per_s, 50e9);
        assert_eq!(p.scale_out.effective_bytes_per_s, 40e9);
        assert_eq!(p.scale_out.latency_same_leaf_us, 2.8);
        assert_eq!(p.scale_out.latency_cross_leaf_us, 3.7);
        assert_eq!(p.scale_up.latency_us, 3.33);
        assert_eq!(p.gpu.sm_count, 132);
        assert_eq!(p.analysis_link(), AnalysisLink::ScaleOut);
        let gb = HardwareProfile::builtin("gb200-nvl72").unwrap();
        assert_eq!(gb.scale_up.domain_gpus, 72);
        assert_eq!(gb.scale_up.unidirectional_bytes_per_s, 900e9);
        assert_eq!(gb.analysis_link(), AnalysisLink::ScaleUp);
    }

    #[test]
    fn unknown_profile_is_an_error_listing_the_known_ones() {
        let err = HardwareProfile::load("tpu-v9").unwrap_err().to_string();
        assert!(err.contains("tpu-v9") && err.contains("h800"), "{err}");
    }

    #[test]
    fn zero_bandwidth_is_an_error_naming_the_field() {
        let text = include_str!("../../../config/hardware/h800.toml")
            .replace("effective_bytes_per_s = 40e9", "effective_bytes_per_s = 0");
        let err = HardwareProfile::from_toml_str(&text, "mine.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mine.toml") && err.contains("scale_out.effective_bytes_per_s"),
            "{err}"
        );
    }

    #[test]
    fn negative_bandwidth_is_an_error_naming_the_field() {
        let text = include_str!("../../../config/hardware/h800.toml")
            .replace("nic_bytes_per_s = 50e9", "nic_bytes_per_s = -50e9");
        let err = HardwareProfile::from_toml_str(&text, "mine.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("scale_out.nic_bytes_per_s"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key() {
        let text = include_str!("../../../config/hardware/h800.toml")
            .replace("sm_count = 132", "sm_count = 132\nsm_cont = 1");
        let err = HardwareProfile::from_toml_str(&text, "mine.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sm_cont"), "{err}");
    }

    #[test]
    fn a_users_file_loads_by_path() {
        let dir =
            std::env::temp_dir().join(format!("pdserve-fabric-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.toml");
        let text =
            include_str!("../../../config/hardware/h800.toml").replace("\"h800\"", "\"mine\"");
        std::fs::write(&path, text).unwrap();
        let p = HardwareProfile::load(path.to_str().unwrap()).unwrap();
        assert_eq!(p.name, "mine");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
