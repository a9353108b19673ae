"""The training module routes like DeepSeek-V3 and exports checkpoints transformers reads identically."""

from pathlib import Path

import pytest
import torch

import checkpoint
import fp8
from dsv3 import DeepseekV3, Gate, tiny_v1_config
from train import smoke_config


def _model(seed: int = 0) -> DeepseekV3:
    torch.manual_seed(seed)
    m = DeepseekV3(smoke_config())
    m.init_weights(seed)
    with torch.no_grad():
        for layer in m.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, 0.05)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def test_router_picks_top_k_experts_inside_topk_group_groups_only():
    cfg = tiny_v1_config()
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    _, idx, w = gate(torch.randn(64, cfg["hidden_size"]))
    per_group = cfg["n_routed_experts"] // cfg["n_group"]
    assert idx.shape == (64, cfg["num_experts_per_tok"])
    for row in idx:
        assert len(set(row.tolist())) == cfg["num_experts_per_tok"]
        assert len({e // per_group for e in row.tolist()}) <= cfg["topk_group"]
    torch.testing.assert_close(w.sum(-1), torch.full((64,), cfg["routed_scaling_factor"]))


def test_correction_bias_changes_selection_but_not_the_weights_of_chosen_experts():
    cfg = tiny_v1_config()
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(8, cfg["hidden_size"])
    scores, idx0, _ = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias[7] = 10.0  # expert 7 now always wins selection
    scores1, idx1, w1 = gate(x)
    assert (idx1 == 7).any(-1).all() and not torch.equal(idx0, idx1)
    torch.testing.assert_close(scores, scores1)
    raw = scores1.gather(1, idx1)
    torch.testing.assert_close(w1, raw / raw.sum(-1, keepdim=True) * cfg["routed_scaling_factor"])


def test_experts_match_a_per_token_reference_loop():
    m = _model()
    moe = m.moe_layers()[0]
    x = torch.randn(2, 5, m.cfg["hidden_size"])
    flat = x.reshape(-1, x.shape[-1])
    _, idx, w = moe.gate(flat)
    ref = torch.zeros_like(flat)
    e = moe.experts
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            k = idx[t, j]
            h = torch.nn.functional.silu(e.gate_proj[k] @ flat[t]) * (e.up_proj[k] @ flat[t])
            ref[t] += w[t, j] * (e.down_proj[k] @ h)
    torch.testing.assert_close(e(flat, idx, w), ref, rtol=1e-5, atol=1e-6)


def test_training_step_updates_every_parameter_of_main_model_and_mtp():
    m = _model().train()
    x = torch.randint(0, m.cfg["vocab_size"], (2, 18))
    h = m.forward_main(x[:, :-2])
    loss = torch.nn.functional.cross_entropy(m.logits(h).flatten(0, 1), x[:, 1:-1].flatten())
    hm = m.forward_mtp(h, x[:, 1:-1])
    loss = loss + torch.nn.functional.cross_entropy(m.logits(hm).flatten(0, 1), x[:, 2:].flatten())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_export_uses_deepseek_tensor_names_dtypes_and_quantization_config(tmp_path: Path):
    m = _model()
    checkpoint.export(m, tmp_path, True, 1 << 40)
    cfg = checkpoint.load_config(tmp_path)
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    stored = checkpoint.read_stored(tmp_path)
    n, mtp = cfg["num_hidden_layers"], f"model.layers.{cfg['num_hidden_layers']}"
    for name in [f"{mtp}.embed_tokens.weight", f"{mtp}.shared_head.head.weight", f"{mtp}.enorm.weight",
                 f"{mtp}.hnorm.weight", f"{mtp}.eh_proj.weight", f"{mtp}.shared_head.norm.weight",
                 f"{mtp}.mlp.experts.31.up_proj.weight", f"{mtp}.mlp.gate.e_score_correction_bias",
                 "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv", "lm_head.weight"]:
        assert name in stored, name
    assert not any(".mlp.experts.gate_proj" in k for k in stored)
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            assert t.dtype == torch.float32
        elif fp8.is_fp8_weight(name):
            assert t.dtype == torch.float8_e4m3fn and name + "_scale_inv" in stored
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        else:
            assert t.dtype == torch.bfloat16, name
    assert f"model.layers.{n + 1}.enorm.weight" not in stored


def test_fp8_checkpoint_reloads_to_the_dequantized_weights(tmp_path: Path):
    m = _model()
    checkpoint.export(m, tmp_path, True, 200_000)  # small shards: exercises the index file
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = checkpoint.load_model(tmp_path)
    w = m.model.layers[1].mlp.experts.down_proj[3]
    q, s = fp8.quantize(w.detach())
    torch.testing.assert_close(back.model.layers[1].mlp.experts.down_proj[3], fp8.dequantize(q, s))
    torch.testing.assert_close(back.lm_head.weight, m.lm_head.weight.detach().bfloat16().float())


def test_transformers_deepseek_v3_gives_the_same_logits(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    m = _model()
    checkpoint.export(m, tmp_path, False, 1 << 40, torch.float32)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, m.cfg["vocab_size"], (2, 40))
    with torch.no_grad():
        ours = m.logits(m.forward_main(ids))
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
