//! The paper's closed-form speed limit (ISCA '25 §2.3.2; deepseek-facts.md §1.3).
//!
//! Each GPU holds one expert and processes micro-batches of 32 tokens; each token goes to 8 routed
//! experts plus 1 shared expert; dispatch moves 1 byte (FP8) and combine 2 bytes (BF16) per hidden
//! element; computation is fully hidden behind communication; no latency:
//!
//! ```text
//! comm per micro-batch = (1 B + 2 B) × 32 × 9 × hidden / link bandwidth
//! per layer            = 2 micro-batches × comm per micro-batch
//! TPOT                 = 61 layers × per layer
//! ```
//!
//! With hidden = 7000 ("7K") and a 50 GB/s NIC this gives 120.96 µs, 241.92 µs, 14.76 ms (67 tok/s
//! per user); on GB200 NVL72's 900 GB/s NVLink 6.72 µs, 13.44 µs, 0.82 ms (~1200 tok/s). With the
//! real hidden size 7168 the H800 figure is 123.86 µs.

use serde::Serialize;

use crate::profile::{AnalysisLink, HardwareProfile};
use crate::shape::{BF16_BYTES, FP8_BYTES};

/// The paper's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PaperAssumptions {
    /// Hidden size (the paper's "7K" is 7000; DeepSeek-V3's is 7168).
    pub hidden: u64,
    /// Tokens per micro-batch per GPU (32).
    pub tokens_per_micro_batch: u64,
    /// Expert copies per token: 8 routed + 1 shared (9).
    pub experts_per_token: u64,
    /// Dispatch bytes per element (FP8: 1).
    pub dispatch_bytes_per_element: u64,
    /// Combine bytes per element (BF16: 2).
    pub combine_bytes_per_element: u64,
    /// Layers (61).
    pub layers: u64,
    /// Micro-batches per step (2).
    pub micro_batches: u64,
}

impl PaperAssumptions {
    /// The paper's numbers with the given hidden size.
    pub fn paper(hidden: u64) -> Self {
        Self {
            hidden,
            tokens_per_micro_batch: 32,
            experts_per_token: 9,
            dispatch_bytes_per_element: FP8_BYTES,
            combine_bytes_per_element: BF16_BYTES,
            layers: 61,
            micro_batches: 2,
        }
    }
}

/// One row of the paper's table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PaperAnalysis {
    /// Profile name.
    pub hardware: String,
    /// Link charged.
    pub link: AnalysisLink,
    /// Its nominal bandwidth, bytes/s.
    pub link_bytes_per_s: f64,
    /// The inputs.
    pub assumptions: PaperAssumptions,
    /// Dispatch of one micro-batch, µs.
    pub dispatch_us: f64,
    /// Combine of one micro-batch, µs.
    pub combine_us: f64,
    /// Dispatch + combine of one micro-batch, µs.
    pub comm_per_micro_batch_us: f64,
    /// One layer (all micro-batches), µs.
    pub per_layer_us: f64,
    /// Time per output token, ms.
    pub tpot_ms: f64,
    /// Tokens/s seen by one user (1 / TPOT).
    pub tokens_per_s_per_user: f64,
    /// Tokens/s per GPU (micro-batches × tokens per micro-batch / TPOT).
    pub tokens_per_s_per_gpu: f64,
    /// GPUs per node in the profile.
    pub gpus_per_node: u32,
    /// Tokens/s per node.
    pub tokens_per_s_per_node: f64,
}

/// The paper's analysis on `profile`'s `link`.
pub fn paper_analysis(
    profile: &HardwareProfile,
    assumptions: PaperAssumptions,
    link: AnalysisLink,
) -> PaperAnalysis {
    let bw = match link {
        AnalysisLink::ScaleOut => profile.scale_out.nic_bytes_per_s,
        AnalysisLink::ScaleUp => profile.scale_up.unidirectional_bytes_per_s,
    };
    let a = assumptions;
    let copies = (a.tokens_per_micro_batch * a.experts_per_token * a.hidden) as f64;
    let dispatch_us = copies * a.dispatch_bytes_per_element as f64 / bw * 1e6;
    let combine_us = copies * a.combine_bytes_per_element as f64 / bw * 1e6;
    let comm = dispatch_us + combine_us;
    let per_layer_us = a.micro_batches as f64 * comm;
    let tpot_us = a.layers as f64 * per_layer_us;
    let per_gpu = (a.micro_batches * a.tokens_per_micro_batch) as f64 / (tpot_us / 1e6);
    PaperAnalysis {
        hardware: profile.name.clone(),
        link,
        link_bytes_per_s: bw,
        assumptions: a,
        dispatch_us,
        combine_us,
        comm_per_micro_batch_us: comm,
        per_layer_us,
        tpot_ms: tpot_us / 1e3,
        tokens_per_s_per_user: 1e6 / tpot_us,
        tokens_per_s_per_gpu: per_gpu,
        gpus_per_node: profile.node.gpus_per_node,
        tokens_per_s_per_node: per_gpu * f64::from(profile.node.gpus_per_node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: f64, expected: f64, rel: f64) -> bool {
        ((actual - expected) / expected).abs() <= rel
    }

    fn row(profile: &str, hidden: u64) -> PaperAnalysis {
        let p = HardwareProfile::builtin(profile).unwrap();
        let link = p.analysis_link();
        paper_analysis(&p, PaperAssumptions::paper(hidden), link)
    }

    #[test]
    fn h800_with_hidden_7000_reproduces_the_papers_speed_limit() {
        let r = row("h800", 7000);
        assert!(
            within(r.comm_per_micro_batch_us, 120.96, 0.005),
            "{}",
            r.comm_per_micro_batch_us
        );
        assert!(within(r.per_layer_us, 241.92, 0.005));
        assert!(within(r.tpot_ms, 14.76, 0.005));
        // The paper's "67 tokens per second" truncates 67.76.
        assert!(within(r.tokens_per_s_per_user, 67.76, 0.005));
        assert_eq!(r.tokens_per_s_per_user.floor(), 67.0);
    }

    #[test]
    fn h800_with_hidden_7168_gives_123_86_us() {
        let r = row("h800", 7168);
        assert!(
            within(r.comm_per_micro_batch_us, 123.86, 0.005),
            "{}",
            r.comm_per_micro_batch_us
        );
        assert!(within(r.tpot_ms, 15.11, 0.005));
    }

    #[test]
    fn gb200_nvl72_reproduces_the_papers_speed_limit() {
        let r = row("gb200-nvl72", 7000);
        assert!(within(r.comm_per_micro_batch_us, 6.72, 0.005));
        assert!(within(r.per_layer_us, 13.44, 0.005));
        assert!(within(r.tpot_ms, 0.82, 0.005));
        // "approximately 1200": exactly 1219.75.
        assert!(within(r.tokens_per_s_per_user, 1219.75, 0.005));
        assert!(within(r.tokens_per_s_per_user, 1200.0, 0.02));
    }
}
