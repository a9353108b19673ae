//! Shared helpers of the model crate's integration tests: golden checkpoints, temporary copies,
//! caches, tensor comparisons and seeded token ids.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on error, like the tests"
)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pdserve_model::{ContiguousLatentCache, DeepSeekV3};

/// A committed golden checkpoint directory.
pub fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens")
        .join(name)
}

/// Copies the files of `src` into a new temporary directory.
pub fn copy_to_temp(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// An empty contiguous cache sized for `model`.
pub fn new_cache(model: &DeepSeekV3) -> ContiguousLatentCache {
    let c = model.config();
    ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu)
}

/// max |a − b| over two tensors of equal shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
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

/// Deterministic pseudo-random token ids below `vocab`.
pub fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}
