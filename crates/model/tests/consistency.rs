//! Internal consistency of the forward: the plain and absorbed attention paths, decode through
//! the latent cache, chunked prefill, ragged batches, and batched MTP all agree with the
//! single-sequence full forward. Tolerance: max |Δlogits| ≤ 1e-4 (f32; observed ~1e-6).

#![allow(
    clippy::unwrap_used,
    reason = "helpers fail the test on error, like the tests"
)]

mod common;

use candle_core::{Device, Tensor};
use common::{golden_dir, max_abs_diff, new_cache, tokens};
use pdserve_model::{
    AttentionPath, DeepSeekV3, ForwardOptions, LatentCache, LocalExperts, LogitsWanted,
    SequenceInput,
};

const TOL: f32 = 1e-4;

fn tiny() -> (DeepSeekV3, LocalExperts) {
    DeepSeekV3::load(&golden_dir("tiny"), &Device::Cpu).unwrap()
}

fn opts(path: AttentionPath) -> ForwardOptions {
    ForwardOptions { attention: path }
}

fn full_logits(
    model: &DeepSeekV3,
    experts: &LocalExperts,
    toks: &[u32],
    path: AttentionPath,
) -> (Tensor, Tensor) {
    let mut cache = new_cache(model);
    let input = SequenceInput::new(0, toks.to_vec(), 0).with_logits(LogitsWanted::All);
    let out = model
        .forward(&[input], &mut cache, experts, &opts(path))
        .unwrap();
    (out.logits, out.hidden)
}

#[test]
fn decode_through_latent_cache_equals_full_forward_at_every_position() {
    let (model, experts) = tiny();
    let toks = tokens(1, 30, model.config().vocab_size);
    let (full, full_hidden) = full_logits(&model, &experts, &toks, AttentionPath::Plain);
    let mut cache = new_cache(&model);
    let mut hidden = Vec::new();
    for (i, &t) in toks.iter().enumerate() {
        // Auto: one new token takes the absorbed path.
        let out = model
            .forward(
                &[SequenceInput::new(0, vec![t], i)],
                &mut cache,
                &experts,
                &ForwardOptions::default(),
            )
            .unwrap();
        let d = max_abs_diff(&out.logits, &full.narrow(0, i, 1).unwrap());
        assert!(d <= TOL, "position {i}: {d}");
        hidden.push(out.hidden);
    }
    assert_eq!(cache.len(0, 0), toks.len());
    let stepped_hidden = Tensor::cat(&hidden, 0).unwrap();
    assert!(max_abs_diff(&stepped_hidden, &full_hidden) <= TOL);
}

#[test]
fn absorbed_and_plain_paths_agree_on_long_chunks() {
    let (model, experts) = tiny();
    let toks = tokens(2, 24, model.config().vocab_size);
    let (plain, _) = full_logits(&model, &experts, &toks, AttentionPath::Plain);
    let (absorbed, _) = full_logits(&model, &experts, &toks, AttentionPath::Absorbed);
    let d = max_abs_diff(&plain, &absorbed);
    assert!(d <= TOL, "{d}");
}

#[test]
fn chunked_prefill_equals_single_prefill() {
    let (model, experts) = tiny();
    let toks = tokens(3, 26, model.config().vocab_size);
    let (full, _) = full_logits(&model, &experts, &toks, AttentionPath::Plain);
    let mut cache = new_cache(&model);
    let mut start = 0;
    for chunk in [11usize, 3, 1, 11] {
        let input = SequenceInput::new(9, toks[start..start + chunk].to_vec(), start)
            .with_logits(LogitsWanted::All);
        let out = model
            .forward(&[input], &mut cache, &experts, &ForwardOptions::default())
            .unwrap();
        let d = max_abs_diff(&out.logits, &full.narrow(0, start, chunk).unwrap());
        assert!(d <= TOL, "chunk at {start}: {d}");
        start += chunk;
    }
}

#[test]
fn padded_batch_of_different_lengths_equals_each_sequence_alone() {
    let (model, experts) = tiny();
    let v = model.config().vocab_size;
    // Four sequences: fresh prompts of different lengths, a continuing chunk and decode tokens.
    let histories = [
        vec![],
        tokens(10, 6, v),
        vec![],
        tokens(11, 17, v),
        tokens(12, 3, v),
    ];
    let news = [
        tokens(20, 9, v),
        tokens(21, 1, v),
        tokens(22, 1, v),
        tokens(23, 4, v),
        tokens(24, 12, v),
    ];
    for path in [
        AttentionPath::Auto,
        AttentionPath::Plain,
        AttentionPath::Absorbed,
    ] {
        // Each alone.
        let mut alone = Vec::new();
        for (h, n) in histories.iter().zip(&news) {
            let mut cache = new_cache(&model);
            if !h.is_empty() {
                model
                    .forward(
                        &[SequenceInput::new(0, h.clone(), 0)],
                        &mut cache,
                        &experts,
                        &opts(path),
                    )
                    .unwrap();
            }
            let input = SequenceInput::new(0, n.clone(), h.len()).with_logits(LogitsWanted::All);
            alone.push(
                model
                    .forward(&[input], &mut cache, &experts, &opts(path))
                    .unwrap(),
            );
        }
        // Together: histories prefilled in one batch, then all new tokens in another.
        let mut cache = new_cache(&model);
        let prefill: Vec<SequenceInput> = histories
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| {
                SequenceInput::new(100 + i as u64, h.clone(), 0).with_logits(LogitsWanted::None)
            })
            .collect();
        model
            .forward(&prefill, &mut cache, &experts, &opts(path))
            .unwrap();
        let batch: Vec<SequenceInput> = news
            .iter()
            .enumerate()
            .map(|(i, n)| {
                SequenceInput::new(100 + i as u64, n.clone(), histories[i].len())
                    .with_logits(LogitsWanted::All)
            })
            .collect();
        let together = model
            .forward(&batch, &mut cache, &experts, &opts(path))
            .unwrap();
        for (i, a) in alone.iter().enumerate() {
            let d = max_abs_diff(&together.logits_of(i).unwrap(), &a.logits);
            assert!(d <= TOL, "{path:?} sequence {i}: {d}");
        }
        // The routing trace covers every token of the batch in every MoE layer.
        let n_tokens: usize = news.iter().map(Vec::len).sum();
        let moe_layers = (0..model.config().num_hidden_layers)
            .filter(|&l| model.config().is_moe_layer(l))
            .count();
        assert_eq!(together.routing.layers.len(), moe_layers);
        assert!(
            together
                .routing
                .layers
                .iter()
                .all(|l| l.routing.tokens() == n_tokens)
        );
    }
}

#[test]
fn batched_mtp_equals_each_sequence_alone_and_decode_matches_prefill() {
    let (model, experts) = tiny();
    assert!(model.has_mtp());
    let v = model.config().vocab_size;
    let seqs = [tokens(30, 8, v), tokens(31, 3, v), tokens(32, 14, v)];
    let mut alone = Vec::new();
    for s in &seqs {
        let mut cache = new_cache(&model);
        let main = model
            .forward(
                &[SequenceInput::new(0, s.clone(), 0)],
                &mut cache,
                &experts,
                &ForwardOptions::default(),
            )
            .unwrap();
        let h = main.hidden.narrow(0, 0, s.len() - 1).unwrap();
        let next = SequenceInput::new(0, s[1..].to_vec(), 0).with_logits(LogitsWanted::All);
        let mtp = model
            .mtp_forward(
                &[next],
                &h,
                &mut cache,
                &experts,
                &ForwardOptions::default(),
            )
            .unwrap();
        assert_eq!(cache.len(0, model.config().num_hidden_layers), s.len() - 1);
        alone.push(mtp.logits);
    }
    // Batched: main forward over all, then MTP over all with hidden rows regrouped.
    let mut cache = new_cache(&model);
    let batch: Vec<SequenceInput> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| SequenceInput::new(i as u64, s.clone(), 0))
        .collect();
    let main = model
        .forward(&batch, &mut cache, &experts, &ForwardOptions::default())
        .unwrap();
    let mut rows = Vec::new();
    let mut offset = 0;
    for s in &seqs {
        rows.push(main.hidden.narrow(0, offset, s.len() - 1).unwrap());
        offset += s.len();
    }
    let hidden = Tensor::cat(&rows, 0).unwrap();
    let next: Vec<SequenceInput> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            SequenceInput::new(i as u64, s[1..].to_vec(), 0).with_logits(LogitsWanted::All)
        })
        .collect();
    let mtp = model
        .mtp_forward(
            &next,
            &hidden,
            &mut cache,
            &experts,
            &ForwardOptions::default(),
        )
        .unwrap();
    for (i, a) in alone.iter().enumerate() {
        let d = max_abs_diff(&mtp.logits_of(i).unwrap(), a);
        assert!(d <= TOL, "MTP sequence {i}: {d}");
    }
}

#[test]
fn forward_is_deterministic_and_leaves_inputs_untouched() {
    let (model, experts) = tiny();
    let toks = tokens(40, 10, model.config().vocab_size);
    let (a, _) = full_logits(&model, &experts, &toks, AttentionPath::Auto);
    let (b, _) = full_logits(&model, &experts, &toks, AttentionPath::Auto);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Logits vary by several units: the model is not degenerate.
    let std: f32 = a
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
