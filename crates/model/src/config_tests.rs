//! Unit tests of `config`: parsing, validation errors naming keys, resolved RoPE and MoE.

use super::*;

const TINY: &str = include_str!("../../../config/models/tiny.json");

fn tiny() -> ModelConfig {
    ModelConfig::from_json_str(TINY, Path::new("tiny.json")).unwrap()
}

fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ModelConfig> {
    let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
    edit(&mut v);
    ModelConfig::from_json_str(&v.to_string(), Path::new("edited.json"))
}

fn key_of(e: ModelError) -> String {
    match e {
        ModelError::Config { key, .. } => key,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn tiny_config_keeps_v3_routing_structure() {
    let c = tiny();
    let moe = c.moe().unwrap();
    assert_eq!(moe.n_routed_experts, 256);
    assert_eq!((moe.top_k, moe.n_group, moe.topk_group), (8, 8, 4));
    assert_eq!(moe.scoring, ScoringFunc::Sigmoid);
    assert_eq!(moe.method, TopkMethod::NoauxTc);
    assert!(c.is_moe_layer(1) && !c.is_moe_layer(0) && c.is_moe_layer(4));
}

#[test]
fn v2_style_values_parse() {
    let c = with(|v| {
        v["q_lora_rank"] = serde_json::Value::Null;
        v["scoring_func"] = "softmax".into();
        v["topk_method"] = "greedy".into();
        v["n_group"] = 1.into();
        v["topk_group"] = 1.into();
        v["norm_topk_prob"] = false.into();
    })
    .unwrap();
    let moe = c.moe().unwrap();
    assert_eq!(moe.method, TopkMethod::Greedy);
    assert_eq!(moe.scoring, ScoringFunc::Softmax);
    assert_eq!(c.q_lora_rank, None);
}

#[test]
fn unsupported_values_name_their_key() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "scoring_func",
            Box::new(|v| v["scoring_func"] = "relu".into()),
        ),
        (
            "topk_method",
            Box::new(|v| v["topk_method"] = "random".into()),
        ),
        ("hidden_act", Box::new(|v| v["hidden_act"] = "gelu".into())),
        ("n_group", Box::new(|v| v["n_group"] = 7.into())),
        ("topk_group", Box::new(|v| v["topk_group"] = 9.into())),
        (
            "num_key_value_heads",
            Box::new(|v| v["num_key_value_heads"] = 2.into()),
        ),
        (
            "qk_rope_head_dim",
            Box::new(|v| v["qk_rope_head_dim"] = 15.into()),
        ),
        (
            "rope_scaling.type",
            Box::new(|v| v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
        ),
        (
            "rope_scaling.factor",
            Box::new(|v| v["rope_scaling"] = serde_json::json!({"type": "yarn"})),
        ),
        (
            "quantization_config.fmt",
            Box::new(|v| {
                v["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e5m2"})
            }),
        ),
        (
            "num_nextn_predict_layers",
            Box::new(|v| v["num_nextn_predict_layers"] = 3.into()),
        ),
    ];
    for (key, edit) in cases {
        assert_eq!(key_of(with(edit).unwrap_err()), key);
    }
}

#[test]
fn missing_required_key_is_a_json_error_naming_it() {
    let e = with(|v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    })
    .unwrap_err();
    assert!(e.to_string().contains("hidden_size"), "{e}");
}

#[test]
fn yarn_uses_mscale_ratio_for_tables_and_mscale_all_dim_for_softmax() {
    let c = with(|v| {
        v["rope_scaling"] = serde_json::json!({
            "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707
        })
    })
    .unwrap();
    let y = c.rope().unwrap().yarn.unwrap();
    let expected = yarn_mscale(40.0, 1.0) / yarn_mscale(40.0, 0.707);
    assert!((y.attention_factor - expected).abs() < 1e-12);
    let m = yarn_mscale(40.0, 0.707);
    let base = (48f64).powf(-0.5);
    assert!((c.softmax_scale().unwrap() - base * m * m).abs() < 1e-12);
}

#[test]
fn transformers5_rope_parameters_are_read() {
    let c = with(|v| {
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 50000.0}),
        );
    })
    .unwrap();
    assert_eq!(
        c.rope().unwrap(),
        RopeSpec {
            theta: 50000.0,
            yarn: None
        }
    );
}

#[test]
fn latent_cache_bytes_match_paper_at_v3_shape() {
    let mut c = tiny();
    c.kv_lora_rank = 512;
    c.qk_rope_head_dim = 64;
    c.num_hidden_layers = 61;
    assert_eq!(c.latent_cache_bytes_per_token(2), 70_272);
}
