"""Deterministic weights for the goldens, drawn directly under DeepSeek's released tensor names.

Every tensor is drawn from its own generator seeded by ``(seed, crc32(name), trial)``, so a tensor's
values depend only on its name and the seed, never on drawing order. Matrices are drawn
``N(0, gain / sqrt(fan_in))`` (activations stay O(1)); ``lm_head`` / ``shared_head.head`` use gain
3 so that logits have a standard deviation of a few units; RMSNorm weights are ``1 + N(0, 0.1)``;
embeddings are ``N(0, 1)``. All values are rounded to bfloat16 (exactly representable in the
stored bf16 tensors); ``e_score_correction_bias`` stays float32, as in DeepSeek-V3's checkpoint.

``trial`` only reseeds the router (``mlp.gate.*``): make_goldens.py bumps it until every routing
decision has a safe margin.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

LM_HEAD_GAIN = 3.0
GATE_GAIN = 1.0
NORM_JITTER = 0.1
BIAS_STD = 0.05


def _rng(seed: int, name: str, trial: int) -> np.random.Generator:
    t = trial if ".mlp.gate." in name else 0
    return np.random.default_rng([seed, zlib.crc32(name.encode()), t])


def _bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)


def _matrix(seed: int, trial: int, name: str, out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
    a = _rng(seed, name, trial).standard_normal((out_dim, in_dim)) * (gain / np.sqrt(in_dim))
    return _bf16(a)


def _norm(seed: int, name: str, dim: int) -> torch.Tensor:
    return _bf16(1.0 + NORM_JITTER * _rng(seed, name, 0).standard_normal(dim))


def uses_bias(cfg: dict) -> bool:
    return cfg["topk_method"] == "noaux_tc"


def _layer(cfg: dict, seed: int, trial: int, p: str, moe: bool) -> dict[str, torch.Tensor]:
    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kvr = cfg["kv_lora_rank"]
    t: dict[str, torch.Tensor] = {}
    t[f"{p}.input_layernorm.weight"] = _norm(seed, f"{p}.input_layernorm.weight", h)
    t[f"{p}.post_attention_layernorm.weight"] = _norm(seed, f"{p}.post_attention_layernorm.weight", h)
    a = f"{p}.self_attn"
    if cfg["q_lora_rank"] is None:
        t[f"{a}.q_proj.weight"] = _matrix(seed, trial, f"{a}.q_proj.weight", nh * qk, h)
    else:
        qr = cfg["q_lora_rank"]
        t[f"{a}.q_a_proj.weight"] = _matrix(seed, trial, f"{a}.q_a_proj.weight", qr, h)
        t[f"{a}.q_a_layernorm.weight"] = _norm(seed, f"{a}.q_a_layernorm.weight", qr)
        t[f"{a}.q_b_proj.weight"] = _matrix(seed, trial, f"{a}.q_b_proj.weight", nh * qk, qr)
    t[f"{a}.kv_a_proj_with_mqa.weight"] = _matrix(
        seed, trial, f"{a}.kv_a_proj_with_mqa.weight", kvr + cfg["qk_rope_head_dim"], h
    )
    t[f"{a}.kv_a_layernorm.weight"] = _norm(seed, f"{a}.kv_a_layernorm.weight", kvr)
    t[f"{a}.kv_b_proj.weight"] = _matrix(
        seed, trial, f"{a}.kv_b_proj.weight", nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kvr
    )
    t[f"{a}.o_proj.weight"] = _matrix(seed, trial, f"{a}.o_proj.weight", h, nh * cfg["v_head_dim"])
    m = f"{p}.mlp"
    if not moe:
        inter = cfg["intermediate_size"]
        t[f"{m}.gate_proj.weight"] = _matrix(seed, trial, f"{m}.gate_proj.weight", inter, h)
        t[f"{m}.up_proj.weight"] = _matrix(seed, trial, f"{m}.up_proj.weight", inter, h)
        t[f"{m}.down_proj.weight"] = _matrix(seed, trial, f"{m}.down_proj.weight", h, inter)
        return t
    n_exp = cfg["n_routed_experts"]
    mi = cfg["moe_intermediate_size"]
    t[f"{m}.gate.weight"] = _matrix(seed, trial, f"{m}.gate.weight", n_exp, h, GATE_GAIN)
    if uses_bias(cfg):
        name = f"{m}.gate.e_score_correction_bias"
        bias = _rng(seed, name, trial).standard_normal(n_exp) * BIAS_STD
        t[name] = torch.from_numpy(bias.astype(np.float32))
    for e in range(n_exp):
        x = f"{m}.experts.{e}"
        t[f"{x}.gate_proj.weight"] = _matrix(seed, trial, f"{x}.gate_proj.weight", mi, h)
        t[f"{x}.up_proj.weight"] = _matrix(seed, trial, f"{x}.up_proj.weight", mi, h)
        t[f"{x}.down_proj.weight"] = _matrix(seed, trial, f"{x}.down_proj.weight", h, mi)
    si = mi * cfg["n_shared_experts"]
    s = f"{m}.shared_experts"
    t[f"{s}.gate_proj.weight"] = _matrix(seed, trial, f"{s}.gate_proj.weight", si, h)
    t[f"{s}.up_proj.weight"] = _matrix(seed, trial, f"{s}.up_proj.weight", si, h)
    t[f"{s}.down_proj.weight"] = _matrix(seed, trial, f"{s}.down_proj.weight", h, si)
    return t


def deepseek_tensors(cfg: dict, seed: int, trial: int) -> dict[str, torch.Tensor]:
    """All checkpoint tensors under DeepSeek's names, sorted by name.

    The MTP module sits at layer index ``num_hidden_layers`` with ``enorm``, ``hnorm``, ``eh_proj``,
    one MLA + MoE block, ``shared_head.norm`` and ``shared_head.head``; like DeepSeek-V3's
    checkpoint it also carries ``embed_tokens``. Its ``embed_tokens`` and ``shared_head.head`` are
    copies of the main model's ``model.embed_tokens`` and ``lm_head`` (shared in DeepSeek-V3).
    """
    h = cfg["hidden_size"]
    v = cfg["vocab_size"]
    n_layers = cfg["num_hidden_layers"]
    t: dict[str, torch.Tensor] = {}
    embed = _bf16(_rng(seed, "model.embed_tokens.weight", 0).standard_normal((v, h)))
    head = _matrix(seed, trial, "lm_head.weight", v, h, LM_HEAD_GAIN)
    t["model.embed_tokens.weight"] = embed
    t["model.norm.weight"] = _norm(seed, "model.norm.weight", h)
    t["lm_head.weight"] = head
    for i in range(n_layers):
        t.update(_layer(cfg, seed, trial, f"model.layers.{i}", i >= cfg["first_k_dense_replace"]))
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{n_layers + k}"
        t.update(_layer(cfg, seed, trial, p, True))
        t[f"{p}.enorm.weight"] = _norm(seed, f"{p}.enorm.weight", h)
        t[f"{p}.hnorm.weight"] = _norm(seed, f"{p}.hnorm.weight", h)
        t[f"{p}.eh_proj.weight"] = _matrix(seed, trial, f"{p}.eh_proj.weight", h, 2 * h)
        t[f"{p}.embed_tokens.weight"] = embed.clone()
        t[f"{p}.shared_head.norm.weight"] = _norm(seed, f"{p}.shared_head.norm.weight", h)
        t[f"{p}.shared_head.head.weight"] = head.clone()
    return dict(sorted(t.items()))


def fuse_experts(tensors: dict[str, torch.Tensor], prefix: str, n_exp: int) -> dict[str, torch.Tensor]:
    """transformers' fused expert layout for one MoE block ``prefix`` (``...mlp``): ``experts.gate_up_proj``
    [E, 2*I, H] (gate rows then up rows) and ``experts.down_proj`` [E, H, I]; all in float32."""
    gate_up = [
        torch.cat(
            [
                tensors[f"{prefix}.experts.{e}.gate_proj.weight"].float(),
                tensors[f"{prefix}.experts.{e}.up_proj.weight"].float(),
            ],
            dim=0,
        )
        for e in range(n_exp)
    ]
    down = [tensors[f"{prefix}.experts.{e}.down_proj.weight"].float() for e in range(n_exp)]
    return {
        f"{prefix}.experts.gate_up_proj": torch.stack(gate_up),
        f"{prefix}.experts.down_proj": torch.stack(down),
    }


def to_transformers(cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split DeepSeek-named tensors into (main model state dict, MtpModel state dict), float32,
    with experts fused as transformers 5 holds them."""
    n_layers = cfg["num_hidden_layers"]
    n_exp = cfg["n_routed_experts"]
    main: dict[str, torch.Tensor] = {}
    mtp: dict[str, torch.Tensor] = {}
    moe_prefixes = set()
    for name, value in tensors.items():
        if ".mlp.experts." in name:
            moe_prefixes.add(name.split(".experts.")[0])
            continue
        parts = name.split(".")
        if parts[1] == "layers" and int(parts[2]) >= n_layers:
            k = int(parts[2]) - n_layers
            rest = ".".join(parts[3:])
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model
            if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                mtp[f"layers.{k}.{rest}"] = value.float()
            elif rest == "shared_head.norm.weight":
                mtp[f"layers.{k}.post_norm.weight"] = value.float()
            else:
                mtp[f"layers.{k}.mtp_block.{rest}"] = value.float()
        else:
            main[name] = value.float()
    for prefix in sorted(moe_prefixes):
        fused = fuse_experts(tensors, prefix, n_exp)
        layer = int(prefix.split(".")[2])
        if layer >= n_layers:
            k = layer - n_layers
            for name, value in fused.items():
                mtp[f"layers.{k}.mtp_block." + name.split(".", 3)[3]] = value
        else:
            main.update(fused)
    return main, mtp
