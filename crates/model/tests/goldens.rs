//! Numeric goldens: logits, MTP logits and routing of small checkpoints against Hugging Face
//! transformers (see `tests/goldens/README.md`). Tolerance: max |Δ| ≤ 1e-4 on every logit and
//! MTP logit (f32 compute; weights stored bf16), identical expert ids, routing weights to 1e-5.
//! Both attention paths are checked: the plain full-sequence forward, and token-by-token decode
//! through the latent cache with weight absorption.

#![allow(
    clippy::unwrap_used,
    reason = "helpers fail the test on error, like the tests"
)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pdserve_model::{
    AttentionPath, ContiguousLatentCache, DeepSeekV3, ForwardOptions, LocalExperts, LogitsWanted,
    SequenceInput,
};
use serde::Deserialize;

const LOGITS_MAX_ABS: f32 = 1e-4;
const ROUTING_WEIGHT_MAX_ABS: f32 = 1e-5;

#[derive(Debug, Deserialize)]
struct Reference {
    tolerance: Tolerance,
    vocab_size: usize,
    has_mtp: bool,
    sequences: Vec<RefSequence>,
}

#[derive(Debug, Deserialize)]
struct Tolerance {
    logits_max_abs: f64,
    mtp_logits_max_abs: f64,
}

#[derive(Debug, Deserialize)]
struct RefSequence {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    logits: Vec<Vec<f64>>,
    #[serde(default)]
    mtp_logits: Option<Vec<Vec<f64>>>,
    routing: Vec<RefRouting>,
}

#[derive(Debug, Deserialize)]
struct RefRouting {
    layer: usize,
    experts: Vec<Vec<u32>>,
    weights: Vec<Vec<f64>>,
}

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens")
        .join(name)
}

fn load(name: &str) -> (DeepSeekV3, LocalExperts, Reference) {
    let dir = golden_dir(name);
    let (model, experts) = DeepSeekV3::load(&dir, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert!(reference.tolerance.logits_max_abs as f32 <= LOGITS_MAX_ABS);
    assert!(reference.tolerance.mtp_logits_max_abs as f32 <= LOGITS_MAX_ABS);
    assert_eq!(reference.vocab_size, model.config().vocab_size);
    (model, experts, reference)
}

fn max_abs_diff(got: &Tensor, want: &[Vec<f64>]) -> f32 {
    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
    assert_eq!(got.len(), want.len(), "row count");
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - *b as f32).abs());
        }
    }
    worst
}

fn new_cache(model: &DeepSeekV3) -> ContiguousLatentCache {
    let c = model.config();
    ContiguousLatentCache::new(c.kv_lora_rank, c.qk_rope_head_dim, &Device::Cpu)
}

/// Full-sequence (plain) forward: logits at every position, routing of every MoE layer, MTP.
fn check_full_sequence(name: &str) {
    let (model, experts, reference) = load(name);
    for (si, s) in reference.sequences.iter().enumerate() {
        let mut cache = new_cache(&model);
        let input =
            SequenceInput::new(0, s.tokens.clone(), s.positions[0]).with_logits(LogitsWanted::All);
        let options = ForwardOptions {
            attention: AttentionPath::Plain,
        };
        let out = model
            .forward(&[input], &mut cache, &experts, &options)
            .unwrap();
        let diff = max_abs_diff(&out.logits, &s.logits);
        assert!(
            diff <= LOGITS_MAX_ABS,
            "{name} seq {si}: logits max |Δ| {diff}"
        );

        let mut routing = out.routing.layers.clone();
        if reference.has_mtp && s.tokens.len() > 1 {
            let t = s.tokens.len();
            let hidden = out.hidden.narrow(0, 0, t - 1).unwrap();
            let next = SequenceInput::new(0, s.tokens[1..].to_vec(), s.positions[0])
                .with_logits(LogitsWanted::All);
            let mtp = model
                .mtp_forward(&[next], &hidden, &mut cache, &experts, &options)
                .unwrap();
            let want = s.mtp_logits.as_ref().unwrap();
            let diff = max_abs_diff(&mtp.logits, want);
            assert!(
                diff <= LOGITS_MAX_ABS,
                "{name} seq {si}: MTP logits max |Δ| {diff}"
            );
            routing.extend(mtp.routing.layers);
        }
        let expected_layers: Vec<usize> = s.routing.iter().map(|r| r.layer).collect();
        let got_layers: Vec<usize> = routing.iter().map(|r| r.layer).collect();
        assert_eq!(got_layers, expected_layers, "{name} seq {si}: MoE layers");
        for (got, want) in routing.iter().zip(&s.routing) {
            for (t, (ids, weights)) in want.experts.iter().zip(&want.weights).enumerate() {
                let mut pairs: Vec<(u32, f32)> = got
                    .routing
                    .ids_of(t)
                    .iter()
                    .copied()
                    .zip(got.routing.weights_of(t).iter().copied())
                    .collect();
                pairs.sort_by_key(|p| p.0);
                let got_ids: Vec<u32> = pairs.iter().map(|p| p.0).collect();
                assert_eq!(
                    &got_ids, ids,
                    "{name} seq {si} layer {} token {t}: experts",
                    want.layer
                );
                for ((_, g), w) in pairs.iter().zip(weights) {
                    assert!(
                        (g - *w as f32).abs() <= ROUTING_WEIGHT_MAX_ABS,
                        "{name} seq {si} layer {} token {t}: weight {g} vs {w}",
                        want.layer
                    );
                }
            }
        }
    }
}

/// Token-by-token decode through the latent cache (absorbed attention), main model and MTP.
fn check_decode(name: &str) {
    let (model, experts, reference) = load(name);
    let options = ForwardOptions {
        attention: AttentionPath::Absorbed,
    };
    for (si, s) in reference.sequences.iter().enumerate() {
        let mut cache = new_cache(&model);
        let mut hidden_rows = Vec::new();
        for (i, (&tok, &pos)) in s.tokens.iter().zip(&s.positions).enumerate() {
            let out = model
                .forward(
                    &[SequenceInput::new(0, vec![tok], pos)],
                    &mut cache,
                    &experts,
                    &options,
                )
                .unwrap();
            let diff = max_abs_diff(&out.logits, &s.logits[i..=i]);
            assert!(
                diff <= LOGITS_MAX_ABS,
                "{name} seq {si} decode step {i}: logits max |Δ| {diff}"
            );
            hidden_rows.push(out.hidden);
        }
        if reference.has_mtp {
            let want = s.mtp_logits.as_ref().unwrap();
            for i in 0..s.tokens.len().saturating_sub(1) {
                let next = SequenceInput::new(0, vec![s.tokens[i + 1]], s.positions[i]);
                let mtp = model
                    .mtp_forward(&[next], &hidden_rows[i], &mut cache, &experts, &options)
                    .unwrap();
                let diff = max_abs_diff(&mtp.logits, &want[i..=i]);
                assert!(
                    diff <= LOGITS_MAX_ABS,
                    "{name} seq {si} MTP decode step {i}: max |Δ| {diff}"
                );
            }
        }
    }
}

#[test]
fn tiny_v3_full_sequence_matches_transformers() {
    check_full_sequence("tiny");
}

#[test]
fn tiny_v3_token_by_token_absorbed_decode_matches_transformers() {
    check_decode("tiny");
}

#[test]
fn yarn_full_sequence_matches_transformers() {
    check_full_sequence("yarn");
}

#[test]
fn yarn_token_by_token_absorbed_decode_matches_transformers() {
    check_decode("yarn");
}

#[test]
fn v2lite_full_sequence_matches_transformers() {
    check_full_sequence("v2lite");
}

#[test]
fn v2lite_token_by_token_absorbed_decode_matches_transformers() {
    check_decode("v2lite");
}

#[test]
fn sharded_checkpoint_matches_transformers() {
    check_full_sequence("v2lite-sharded");
}
