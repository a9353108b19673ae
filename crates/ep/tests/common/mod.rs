//! Shared harness of the EP runtime tests: the goldens' tiny checkpoint (DeepSeek-V3 routing
//! structure: 256 experts, top-8, 8 groups; hidden 64, 3 layers + MTP, MoE layers 1, 2 and 3),
//! seeded inputs, and real gate routings.

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failure here is a test failure, with the panic's location"
)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pdserve_ep::{EpRuntimeConfig, PlacementConfig};
use pdserve_model::routing::route_logits;
use pdserve_model::{Checkpoint, Routing};

/// The goldens' tiny checkpoint.
pub fn tiny_checkpoint() -> Checkpoint {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/goldens/tiny");
    Checkpoint::open(&dir).expect("the goldens' tiny checkpoint opens")
}

/// A seeded generator (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `[n, h]` seeded hidden states.
pub fn hidden(n: usize, h: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let data: Vec<f32> = (0..n * h).map(|_| rng.unit() * 2.0).collect();
    Tensor::from_vec(data, (n, h), &Device::Cpu).unwrap()
}

/// A real gate routing (group-limited top-8 with DeepSeek-V3's scoring) of `n` tokens from
/// seeded logits.
pub fn gate_routing(ckpt: &Checkpoint, n: usize, seed: u64) -> Routing {
    let spec = ckpt.config().moe().unwrap();
    let mut rng = Rng::new(seed);
    let logits: Vec<f32> = (0..n * spec.n_routed_experts)
        .map(|_| rng.unit() * 3.0)
        .collect();
    route_logits(&logits, n, None, &spec).unwrap()
}

/// Seeded source ranks in `0..d`.
pub fn ranks(n: usize, d: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(d as u64) as u32).collect()
}

/// EP`d` with `r` redundant slots, everything else default.
pub fn config(d: usize, r: usize) -> EpRuntimeConfig {
    EpRuntimeConfig {
        placement: PlacementConfig {
            num_ranks: d,
            num_redundant_experts: r,
            ..PlacementConfig::default()
        },
        ..EpRuntimeConfig::default()
    }
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Exact bits of a tensor.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}
