#!/usr/bin/env python3
"""Cross-check the goldens with a second, independent float32 implementation written directly from
DeepSeek's model definition (complex RoPE on interleaved pairs, YaRN frequency blend and softmax
mscale, group-limited gate, MTP), reading only config.json and the safetensors files.

It shares no code with transformers. Agreement within the goldens' tolerance shows that the recorded
transformers outputs follow DeepSeek's definition, and is an example of what the Rust side does.

Usage::

    python tools/goldens/check_independent.py [crates/model/tests/goldens]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_weights(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    w: dict[str, torch.Tensor] = {}
    for f in files:
        w.update({k: v.float() for k, v in load_file(str(d / f)).items()})
    return w


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_freqs(cfg, positions: torch.Tensor) -> torch.Tensor:
    dim = cfg["qk_rope_head_dim"]
    base = cfg["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.get("rope_scaling")
    if rs and rs.get("type", rs.get("rope_type")) == "yarn":
        factor, orig = rs["factor"], rs["original_max_position_embeddings"]

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(rs["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.polar(torch.ones_like(angles), angles)  # [T, dim/2]


def apply_rope(x, cis):  # x [..., T, heads?, dim] with pairs (2j, 2j+1)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis).flatten(-2)


def softmax_scale(cfg):
    s = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling")
    if rs and rs.get("type", rs.get("rope_type")) == "yarn":
        m = 0.1 * rs.get("mscale_all_dim", 1.0) * math.log(rs["factor"]) + 1.0
        s = s * m * m
    return s


def mla(cfg, w, p, x, cis):
    t = x.shape[0]
    nh, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    eps = cfg["rms_norm_eps"]
    if cfg["q_lora_rank"] is None:
        q = x @ w[f"{p}.q_proj.weight"].T
    else:
        q = rms(x @ w[f"{p}.q_a_proj.weight"].T, w[f"{p}.q_a_layernorm.weight"], eps) @ w[f"{p}.q_b_proj.weight"].T
    q = q.view(t, nh, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    q_pe = apply_rope(q_pe, cis[:, None, :])
    kv = x @ w[f"{p}.kv_a_proj_with_mqa.weight"].T
    c_kv, k_pe = kv[:, : cfg["kv_lora_rank"]], kv[:, cfg["kv_lora_rank"] :]
    k_pe = apply_rope(k_pe, cis)  # [T, dr]
    kvb = (rms(c_kv, w[f"{p}.kv_a_layernorm.weight"], eps) @ w[f"{p}.kv_b_proj.weight"].T).view(t, nh, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    scores = (torch.einsum("shd,thd->hst", q_nope, k_nope) + torch.einsum("shd,td->hst", q_pe, k_pe)) * softmax_scale(cfg)
    mask = torch.full((t, t), float("-inf")).triu(1)
    probs = (scores + mask).softmax(-1)
    out = torch.einsum("hst,thd->shd", probs, v).reshape(t, nh * dv)
    return out @ w[f"{p}.o_proj.weight"].T


def mlp(w, p, x):
    return (F.silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T


def gate(cfg, w, p, x):
    logits = x @ w[f"{p}.gate.weight"].T
    scores = logits.sigmoid() if cfg["scoring_func"] == "sigmoid" else logits.softmax(-1)
    choice = scores.clone()
    if f"{p}.gate.e_score_correction_bias" in w:
        choice = choice + w[f"{p}.gate.e_score_correction_bias"]
    g, kg, k = cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    if g > 1:
        grouped = choice.view(x.shape[0], g, -1)
        gs = grouped.topk(2, -1)[0].sum(-1) if cfg["topk_method"] == "noaux_tc" else grouped.amax(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(kg, -1)[1], True)
        choice = choice.view(x.shape[0], g, -1).masked_fill(~keep[..., None], float("-inf")).flatten(1)
    idx = choice.topk(k, -1)[1]
    wts = scores.gather(1, idx)
    if cfg["norm_topk_prob"]:
        wts = wts / wts.sum(-1, keepdim=True)
    return idx, wts * cfg["routed_scaling_factor"]


def moe(cfg, w, p, x, routing, layer):
    idx, wts = gate(cfg, w, p, x)
    order = idx.argsort(-1)
    routing.append((layer, idx.gather(1, order), wts.gather(1, order)))
    y = torch.zeros_like(x)
    for ti in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[ti, j])
            y[ti] += wts[ti, j] * mlp(w, f"{p}.experts.{e}", x[ti : ti + 1])[0]
    return y + mlp(w, f"{p}.shared_experts", x)


def block(cfg, w, layer, x, cis, routing):
    p = f"model.layers.{layer}"
    eps = cfg["rms_norm_eps"]
    x = x + mla(cfg, w, f"{p}.self_attn", rms(x, w[f"{p}.input_layernorm.weight"], eps), cis)
    h = rms(x, w[f"{p}.post_attention_layernorm.weight"], eps)
    n_layers = cfg["num_hidden_layers"]
    if layer < cfg["first_k_dense_replace"] and layer < n_layers:
        return x + mlp(w, f"{p}.mlp", h)
    return x + moe(cfg, w, f"{p}.mlp", h, routing, layer)


def forward(cfg, w, tokens, positions):
    eps = cfg["rms_norm_eps"]
    cis = rope_freqs(cfg, torch.tensor(positions))
    routing = []
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for layer in range(cfg["num_hidden_layers"]):
        x = block(cfg, w, layer, x, cis, routing)
    h = rms(x, w["model.norm.weight"], eps)
    logits = h @ w["lm_head.weight"].T
    mtp_logits = None
    if cfg.get("num_nextn_predict_layers", 0) and len(tokens) > 1:
        m = cfg["num_hidden_layers"]
        p = f"model.layers.{m}"
        e = w[f"{p}.embed_tokens.weight"][torch.tensor(tokens[1:])]
        z = torch.cat([rms(e, w[f"{p}.enorm.weight"], eps), rms(h[:-1], w[f"{p}.hnorm.weight"], eps)], -1)
        z = z @ w[f"{p}.eh_proj.weight"].T
        z = block(cfg, w, m, z, cis[:-1], routing)
        mtp_logits = rms(z, w[f"{p}.shared_head.norm.weight"], eps) @ w[f"{p}.shared_head.head.weight"].T
    return logits, mtp_logits, routing


def check_dir(d: Path) -> bool:
    cfg = json.loads((d / "config.json").read_text())
    ref = json.loads((d / "reference.json").read_text())
    w = load_weights(d)
    worst, worst_mtp, worst_w, ok = 0.0, 0.0, 0.0, True
    for s in ref["sequences"]:
        logits, mtp_logits, routing = forward(cfg, w, s["tokens"], s["positions"])
        worst = max(worst, float((logits - torch.tensor(s["logits"])).abs().max()))
        if mtp_logits is not None:
            worst_mtp = max(worst_mtp, float((mtp_logits - torch.tensor(s["mtp_logits"])).abs().max()))
        for (layer, ids, wts), r in zip(routing, s["routing"]):
            if layer != r["layer"] or ids.tolist() != r["experts"]:
                print(f"  {d.name}: expert selection differs at layer {layer}")
                ok = False
            worst_w = max(worst_w, float((wts - torch.tensor(r["weights"])).abs().max()))
    tol = ref["tolerance"]["logits_max_abs"]
    ok = ok and worst <= tol and worst_mtp <= tol and worst_w <= 1e-5
    print(f"{d.name}: max|dlogits| {worst:.2e}, max|dmtp| {worst_mtp:.2e}, max|dweights| {worst_w:.2e}, "
          f"experts {'match' if ok else 'MISMATCH'} -> {'ok' if ok else 'FAIL'}")
    return ok


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("crates/model/tests/goldens")
    dirs = sorted(p for p in root.iterdir() if (p / "reference.json").exists())
    results = [check_dir(d) for d in dirs]
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
