//! Bad input never panics: each case returns an error naming the file, tensor or key at fault.

#![allow(
    clippy::unwrap_used,
    reason = "helpers fail the test on error, like the tests"
)]

mod common;

use std::path::Path;

use candle_core::Device;
use common::{copy_to_temp, golden_dir, new_cache};
use pdserve_model::checkpoint::Checkpoint;
use pdserve_model::writer::SafetensorsWriter;
use pdserve_model::{DeepSeekV3, ForwardOptions, ModelError, SequenceInput};
use safetensors::tensor::Dtype;

fn load_err(dir: &Path) -> ModelError {
    match DeepSeekV3::load(dir, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites `model.safetensors` of `dir` through `edit` (which sees every tensor as f32).
fn rewrite(dir: &Path, edit: impl Fn(&str, Vec<usize>, Vec<f32>, &mut SafetensorsWriter)) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut w = SafetensorsWriter::new();
    for name in ckpt.names() {
        let shape = ckpt.shape(name).unwrap().to_vec();
        let data = ckpt.read_f32(name, &shape).unwrap();
        edit(name, shape, data, &mut w);
    }
    drop(ckpt);
    w.write(&dir.join("model.safetensors")).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::Io { ref path, .. } if path.ends_with("config.json")),
        "{e}"
    );
}

#[test]
fn corrupt_config_names_the_file() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 512,").unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::Json { ref path, .. } if path.ends_with("config.json")),
        "{e}"
    );
}

#[test]
fn missing_weights_file_names_it() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_weights_file_is_reported_as_corrupt() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::CorruptFile { ref path, .. } if path.ends_with("model.safetensors")),
        "{e}"
    );
}

#[test]
fn garbage_weights_file_is_reported_as_corrupt() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    let path = dir.path().join("model.safetensors");
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 64]);
    std::fs::write(&path, bytes).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::CorruptFile { .. }), "{e}");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        ModelError::CorruptFile { .. }
    ));
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    let gone = "model.layers.2.mlp.experts.17.up_proj.weight";
    rewrite(dir.path(), |name, shape, data, w| {
        if name != gone {
            w.add_f32(name, &shape, &data).unwrap();
        }
    });
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::MissingTensor { ref name, .. } if name == gone),
        "{e}"
    );
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_file() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    edit_config(dir.path(), |v| v["intermediate_size"] = 96.into());
    let e = load_err(dir.path());
    match e {
        ModelError::ShapeMismatch {
            ref name,
            ref path,
            ref expected,
            ref actual,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert!(path.ends_with("model.safetensors"));
            assert_eq!(
                (expected.as_slice(), actual.as_slice()),
                (&[96, 64][..], &[128, 64][..])
            );
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn unsupported_config_value_names_the_key() {
    for (key, value) in [
        ("scoring_func", serde_json::json!("relu")),
        ("topk_method", serde_json::json!("top1")),
        ("hidden_act", serde_json::json!("gelu")),
        (
            "rope_scaling",
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
        ),
        ("num_key_value_heads", serde_json::json!(1)),
    ] {
        let dir = copy_to_temp(&golden_dir("tiny"));
        edit_config(dir.path(), |v| v[key] = value.clone());
        let e = load_err(dir.path());
        match e {
            ModelError::Config {
                key: ref k,
                ref path,
                ..
            } => {
                assert!(k.starts_with(key), "{key}: {e}");
                assert!(path.ends_with("config.json"));
            }
            other => panic!("{key}: expected a config error, got {other}"),
        }
    }
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    rewrite(dir.path(), |name, shape, data, w| {
        if name == "model.norm.weight" {
            w.add_raw(
                name,
                Dtype::I32,
                &shape,
                data.iter()
                    .flat_map(|x| (*x as i32).to_le_bytes())
                    .collect(),
            );
        } else {
            w.add_f32(name, &shape, &data).unwrap();
        }
    });
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::UnsupportedDtype { ref name, .. } if name == "model.norm.weight"),
        "{e}"
    );
}

#[test]
fn shard_index_pointing_at_a_missing_file_names_it() {
    let dir = copy_to_temp(&golden_dir("v2lite-sharded"));
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn shard_index_listing_a_tensor_its_file_lacks_is_corrupt() {
    let dir = copy_to_temp(&golden_dir("v2lite-sharded"));
    let path = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["weight_map"]["model.not.a.tensor"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("model.not.a.tensor"), "{e}");
    assert!(
        matches!(e, ModelError::CorruptFile { ref path, .. } if path.ends_with("model.safetensors.index.json"))
    );
}

#[test]
fn fp8_weight_without_its_scale_names_the_missing_scale() {
    let dir = copy_to_temp(&golden_dir("tiny"));
    let target = "model.layers.0.self_attn.o_proj.weight";
    rewrite(dir.path(), |name, shape, data, w| {
        if name == target {
            let bytes = data
                .iter()
                .map(|&x| pdserve_model::checkpoint::f32_to_fp8_e4m3(x))
                .collect();
            w.add_raw(name, Dtype::F8_E4M3, &shape, bytes);
        } else {
            w.add_f32(name, &shape, &data).unwrap();
        }
    });
    let e = load_err(dir.path());
    let scale = format!("{target}_scale_inv");
    assert!(
        matches!(e, ModelError::MissingTensor { ref name, .. } if *name == scale),
        "{e}"
    );
}

#[test]
fn forward_rejects_bad_batches_without_panicking() {
    let (model, experts) = DeepSeekV3::load(&golden_dir("tiny"), &Device::Cpu).unwrap();
    let mut cache = new_cache(&model);
    let o = ForwardOptions::default();
    let vocab = model.config().vocab_size as u32;
    let max_pos = model.config().max_position_embeddings;
    let cases: Vec<Vec<SequenceInput>> = vec![
        vec![],
        vec![SequenceInput::new(0, vec![], 0)],
        vec![SequenceInput::new(0, vec![vocab], 0)],
        vec![SequenceInput::new(0, vec![1, 2], max_pos - 1)],
        vec![
            SequenceInput::new(3, vec![1], 0),
            SequenceInput::new(3, vec![2], 0),
        ],
    ];
    for batch in cases {
        let e = model.forward(&batch, &mut cache, &experts, &o).unwrap_err();
        assert!(matches!(e, ModelError::Input(_)), "{e}");
    }
    // MTP hidden rows that do not match the batch.
    let h = candle_core::Tensor::zeros(
        (3, model.config().hidden_size),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = model
        .mtp_forward(
            &[SequenceInput::new(0, vec![1, 2], 0)],
            &h,
            &mut cache,
            &experts,
            &o,
        )
        .unwrap_err();
    assert!(matches!(e, ModelError::Input(_)), "{e}");
}
