//! Storage dtypes and generated checkpoints: FP8 block dequantization (DeepSeek's release
//! format), bf16 checkpoints of an f32 model (looser, stated tolerance), and `model init`.

#![allow(
    clippy::unwrap_used,
    reason = "helpers fail the test on error, like the tests"
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use common::{copy_to_temp, golden_dir, max_abs_diff, new_cache, tokens};
use pdserve_model::checkpoint::{Checkpoint, fp8_e4m3_to_f32};
use pdserve_model::tiny;
use pdserve_model::writer::SafetensorsWriter;
use pdserve_model::{DeepSeekV3, ForwardOptions, LogitsWanted, SequenceInput};

/// Tolerance of a bf16 copy of an f32 model (computation stays f32). Rounding every weight by up
/// to 2⁻⁹ moves logits by ~0.1 where routing is unchanged, but with 256 experts and top-8 some
/// tokens swap a near-tied expert, which moves their logits by units: no max-|Δ| bound holds. The
/// stated tolerance is therefore on the mean and on greedy agreement: mean |Δlogit| ≤ 0.15 × the
/// logits' RMS (observed 0.07 on the tiny model) and the same argmax on ≥ 75% of positions
/// (observed 84%).
const BF16_MEAN_ABS_OVER_RMS: f32 = 0.15;
/// See [`BF16_MEAN_ABS_OVER_RMS`].
const BF16_MIN_TOP1_AGREEMENT: f32 = 0.75;

#[test]
fn fp8_blocks_dequantize_with_their_own_scale_including_partial_blocks() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    let (rows, cols) = (200, 300); // 2 × 3 blocks of 128, the last ones partial
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.001 * (1 + i / (128 * cols)) as f32)
        .collect();
    let mut w = SafetensorsWriter::new();
    w.add_fp8_blocks("w", rows, cols, &data, [128, 128])
        .unwrap();
    w.write(&dir.path().join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let scales = ckpt.read_f32("w_scale_inv", &[2, 3]).unwrap();
    let got = ckpt.read_f32("w", &[rows, cols]).unwrap();
    for r in [0, 127, 128, 199] {
        for c in [0, 127, 128, 255, 256, 299] {
            let x = got[r * cols + c];
            let s = scales[(r / 128) * 3 + c / 128];
            // Exactly a representable FP8 value times its block's scale…
            let code = pdserve_model::checkpoint::f32_to_fp8_e4m3(x / s);
            assert_eq!(fp8_e4m3_to_f32(code) * s, x, "({r}, {c})");
            // …and within FP8's precision (3 mantissa bits) of the original.
            let orig = data[r * cols + c];
            assert!(
                (x - orig).abs() <= orig.abs() / 16.0 + s * 2f32.powi(-9),
                "({r}, {c}): {x} vs {orig}"
            );
        }
    }
}

/// DeepSeek's FP8 release quantizes the linear layers; embeddings, norms, the gate and the head
/// stay in higher precision.
fn is_fp8_candidate(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with("_proj.weight")
        && !name.contains("embed_tokens")
        && !name.contains("shared_head")
}

#[test]
fn fp8_checkpoint_runs_exactly_as_its_dequantized_f32_twin() {
    let fp8 = copy_to_temp(&golden_dir("tiny"));
    let twin = copy_to_temp(&golden_dir("tiny"));
    // Quantize the linear layers; declare the quantization in config.json.
    let src = Checkpoint::open(&golden_dir("tiny")).unwrap();
    let mut w = SafetensorsWriter::new();
    let mut quantized = 0;
    for name in src.names() {
        let shape = src.shape(name).unwrap().to_vec();
        let data = src.read_f32(name, &shape).unwrap();
        if is_fp8_candidate(name, &shape) {
            w.add_fp8_blocks(name, shape[0], shape[1], &data, [128, 128])
                .unwrap();
            quantized += 1;
        } else {
            w.add_f32(name, &shape, &data).unwrap();
        }
    }
    assert!(quantized > 100);
    w.write(&fp8.path().join("model.safetensors")).unwrap();
    let cfg_path = fp8.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // The twin stores the dequantized values as f32.
    let q = Checkpoint::open(fp8.path()).unwrap();
    let mut t = SafetensorsWriter::new();
    for name in q.names().into_iter().filter(|n| !n.ends_with("_scale_inv")) {
        let shape = q.shape(name).unwrap().to_vec();
        t.add_f32(name, &shape, &q.read_f32(name, &shape).unwrap())
            .unwrap();
    }
    t.write(&twin.path().join("model.safetensors")).unwrap();

    let dev = Device::Cpu;
    let (m8, e8) = DeepSeekV3::load(fp8.path(), &dev).unwrap();
    let (mt, et) = DeepSeekV3::load(twin.path(), &dev).unwrap();
    let toks = tokens(5, 12, m8.config().vocab_size);
    let run = |m: &DeepSeekV3, e: &pdserve_model::LocalExperts| {
        let mut cache = new_cache(m);
        let input = SequenceInput::new(0, toks.clone(), 0).with_logits(LogitsWanted::All);
        m.forward(&[input], &mut cache, e, &ForwardOptions::default())
            .unwrap()
            .logits
    };
    assert_eq!(max_abs_diff(&run(&m8, &e8), &run(&mt, &et)), 0.0);
}

/// The embedded default model (tiny config, seed 0, f32), materialized once per test binary.
fn shared_default() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = DIR.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let dir = tiny::ensure_default(Some(root.path())).unwrap();
        (root, dir)
    });
    dir
}

fn copy_as(src: &Path, dst: &Path, bf16: bool) {
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let ckpt = Checkpoint::open(src).unwrap();
    let mut w = SafetensorsWriter::new();
    for name in ckpt.names() {
        let shape = ckpt.shape(name).unwrap().to_vec();
        let data = ckpt.read_f32(name, &shape).unwrap();
        if bf16 {
            w.add_bf16(name, &shape, &data).unwrap();
        } else {
            w.add_f32(name, &shape, &data).unwrap();
        }
    }
    w.write(&dst.join("model.safetensors")).unwrap();
}

fn all_logits(dir: &Path, toks: &[u32]) -> candle_core::Tensor {
    let (m, e) = DeepSeekV3::load(dir, &Device::Cpu).unwrap();
    let mut cache = new_cache(&m);
    let input = SequenceInput::new(0, toks.to_vec(), 0).with_logits(LogitsWanted::All);
    m.forward(&[input], &mut cache, &e, &ForwardOptions::default())
        .unwrap()
        .logits
}

#[test]
fn bf16_checkpoint_computes_exactly_as_f32_of_the_same_values() {
    // The tiny golden's weights are bf16 on disk; an f32 copy holds the same values.
    let f32_copy = tempfile::tempdir().unwrap();
    copy_as(&golden_dir("tiny"), f32_copy.path(), false);
    let toks = tokens(9, 20, 512);
    assert_eq!(
        max_abs_diff(
            &all_logits(&golden_dir("tiny"), &toks),
            &all_logits(f32_copy.path(), &toks)
        ),
        0.0
    );
}

#[test]
fn bf16_copy_of_the_f32_tiny_model_stays_within_the_stated_tolerance() {
    let f32_dir = shared_default();
    let bf16_dir = tempfile::tempdir().unwrap();
    copy_as(f32_dir, bf16_dir.path(), true);
    let toks = tokens(8, 32, 4096);
    let (a, b) = (
        all_logits(f32_dir, &toks),
        all_logits(bf16_dir.path(), &toks),
    );
    let rms: f32 = a
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    let mean: f32 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let am: Vec<u32> = a.argmax(1).unwrap().to_vec1().unwrap();
    let bm: Vec<u32> = b.argmax(1).unwrap().to_vec1().unwrap();
    let agree = am.iter().zip(&bm).filter(|(x, y)| x == y).count() as f32 / am.len() as f32;
    assert!(
        mean > 0.0,
        "the bf16 copy should differ from the f32 original"
    );
    assert!(
        mean <= BF16_MEAN_ABS_OVER_RMS * rms,
        "mean |Δ| {mean}, logit rms {rms}"
    );
    assert!(agree >= BF16_MIN_TOP1_AGREEMENT, "top-1 agreement {agree}");
}

#[test]
fn tiny_init_is_deterministic_per_seed_and_not_degenerate() {
    let cfg = tiny::tiny_config().unwrap();
    let a = tiny::random_weights(&cfg, 3).unwrap();
    let b = tiny::random_weights(&cfg, 3).unwrap();
    let c = tiny::random_weights(&cfg, 4).unwrap();
    assert_eq!(a, b);
    assert_ne!(a[0].data, c[0].data);
    let bias = a
        .iter()
        .find(|t| t.name == "model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap();
    assert!(bias.data.iter().all(|&x| x != 0.0));
    // The MTP layer carries copies of the embedding and the head, as DeepSeek's release does.
    let find = |n: &str| &a.iter().find(|t| t.name == n).unwrap().data;
    assert_eq!(
        find("model.layers.4.embed_tokens.weight"),
        find("model.embed_tokens.weight")
    );
    assert_eq!(
        find("model.layers.4.shared_head.head.weight"),
        find("lm_head.weight")
    );
}

#[test]
fn default_model_is_created_once_in_the_cache_and_reused() {
    let dir = shared_default();
    assert!(dir.ends_with("models/tiny-seed0"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let root = dir.parent().unwrap().parent().unwrap();
    let before = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = tiny::ensure_default(Some(root)).unwrap();
    assert_eq!(dir, again);
    let after = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    // Same seed, same weights as `model init --seed 0`.
    let expected = tiny::random_weights(&tiny::tiny_config().unwrap(), tiny::DEFAULT_SEED).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    for t in expected.iter().step_by(97) {
        assert_eq!(
            ckpt.read_f32(&t.name, &t.shape).unwrap(),
            t.data,
            "{}",
            t.name
        );
    }
    // It loads, and its logits vary by several units.
    let logits = all_logits(dir, &tokens(1, 16, 4096));
    let std: f32 = logits
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(std > 1.0, "logit std {std}");
}
