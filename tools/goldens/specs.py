"""Golden model definitions: DeepSeek-style config.json dicts and the token sequences to record.

Every config is written verbatim as the golden's ``config.json`` (DeepSeek's released key names,
``rope_scaling`` in DeepSeek-V3's form), so the Rust loader reads exactly what a released checkpoint
carries. ``transformers`` reads the same file.
"""

from __future__ import annotations

COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "moe_layer_freq": 1,
    "torch_dtype": "bfloat16",
}

# DeepSeek-V3 routing structure (256 experts, top-8, 8 groups, top-4 groups, 1 shared, sigmoid +
# correction bias, scaling 2.5, MTP depth 1) at committable size.
TINY = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
    **COMMON,
}

# YaRN as DeepSeek-V3 configures it (factor 40, beta_fast 32, beta_slow 1, mscale 1.0,
# mscale_all_dim 1.0) with a small original context (32) so that recorded positions and relative
# distances exceed it; 64 experts in 4 groups, top-6 of top-2 groups, 2 shared experts.
YARN = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 40,
    "kv_lora_rank": 48,
    "qk_nope_head_dim": 24,
    "qk_rope_head_dim": 16,
    "v_head_dim": 20,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 1280,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    **COMMON,
}

# DeepSeek-V2-Lite style: no query compression, softmax scores, greedy top-k without groups,
# unnormalized top-k weights, scaling 1.0, no MTP.
V2LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
    **COMMON,
}

# (length, first position). Every sequence starts at its first position with no earlier context:
# position_ids are recorded explicitly and are what the model was given.
SEQUENCES = {
    "tiny": [(1, 0), (7, 0), (23, 0)],
    "yarn": [(1, 0), (7, 0), (23, 0), (40, 0), (23, 1000)],
    "v2lite": [(1, 0), (7, 0), (23, 0)],
}

CONFIGS = {"tiny": TINY, "yarn": YARN, "v2lite": V2LITE}

# Seeds: weights, token sequences. Fixed, so regeneration gives identical files.
SEEDS = {"tiny": 1001, "yarn": 2002, "v2lite": 3003}

# Name of the golden that also gets a two-shard copy (the smallest one).
SHARDED = "v2lite"
