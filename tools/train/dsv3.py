"""DeepSeek-V3 architecture in plain PyTorch, for training pdserve's tiny checkpoint.

Principal types: :class:`DeepseekV3` (main model + MTP module), :func:`tiny_v1_config` (the shipped
model's ``config.json`` dict).

Faithful to Hugging Face ``DeepseekV3ForCausalLM`` (same maths, same parameter names, so that
``state_dict`` keys are the checkpoint's tensor names):

* MLA: ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``; ``kv_a_proj_with_mqa`` -> (``c_kv``,
  ``k_rope``); ``kv_a_layernorm``; ``kv_b_proj``; interleaved RoPE on the rope part of q and k
  (``rope_interleave``); softmax scale ``qk_head_dim ** -0.5``.
* MoE: sigmoid router in fp32; ``e_score_correction_bias`` is added for *selection only*;
  group-limited top-k (``n_group`` groups scored by the sum of their top-2, ``topk_group`` kept);
  weights are the un-biased scores, normalised (``norm_topk_prob``) and multiplied by
  ``routed_scaling_factor``; one shared expert; SwiGLU experts.
* MTP (layer index ``num_hidden_layers``): ``eh_proj(cat[enorm(embed(t_{i+1})), hnorm(h_i)])`` where
  ``h_i`` is the main model's final hidden state after its final norm, one decoder block, then
  ``shared_head.norm`` and the shared output head (``lm_head``, also stored as
  ``shared_head.head``).

Routed experts are held stacked (``experts.gate_proj`` ``[E, I, H]`` etc.) and run as one padded
batched matmul; the exporter splits them into DeepSeek's per-expert tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def tiny_v1_config() -> dict:
    """The shipped checkpoint's config.json (DeepSeek-V3 keys, tiny dimensions)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.0001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 2,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 1024,
        "kv_lora_rank": 64,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 32,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 8,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 5,
        "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_interleave": True,
        "rope_scaling": None,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": 4096,
    }


@dataclass
class RouterStats:
    """Per-forward routing statistics of one MoE layer (for balancing and logging)."""

    load: torch.Tensor  # [E] tokens routed to each expert (float)
    balance_loss: torch.Tensor  # scalar sequence-wise balance loss (un-weighted)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_cos_sin(cfg: dict, seq_len: int, device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported by the training module (config key rope_scaling)")
    d = cfg["qk_rope_head_dim"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()  # [T, d/2]


def apply_rope_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)...; output in de-interleaved layout (as HF)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    cos = torch.cat([cos, cos], -1).to(x.dtype)
    sin = torch.cat([sin, sin], -1).to(x.dtype)
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.nope = cfg["qk_nope_head_dim"]
        self.rope = cfg["qk_rope_head_dim"]
        self.v_dim = cfg["v_head_dim"]
        self.kv_rank = cfg["kv_lora_rank"]
        self.interleave = cfg.get("rope_interleave", True)
        qk = self.nope + self.rope
        self.scale = qk ** -0.5
        self.q_a_proj = nn.Linear(h, cfg["q_lora_rank"], bias=False)
        self.q_a_layernorm = RMSNorm(cfg["q_lora_rank"], 1e-6)
        self.q_b_proj = nn.Linear(cfg["q_lora_rank"], self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope + self.rope).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        ckv = self.kv_a_proj_with_mqa(x)
        kv_nope, k_rot = ckv.split([self.kv_rank, self.rope], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)
        k_rot = k_rot.view(b, 1, t, self.rope)
        rope = apply_rope_interleave if self.interleave else apply_rope_half
        q_rot = rope(q_rot, cos, sin)
        k_rot = rope(k_rot, cos, sin)
        kv = self.kv_b_proj(kv_nope).view(b, t, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(b, self.n_heads, t, self.rope)], dim=-1)
        q = torch.cat([q_pass, q_rot], dim=-1)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with selection bias and group-limited top-k (DeepSeek-V3 ``noaux_tc``)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_experts = cfg["n_routed_experts"]
        self.top_k = cfg["num_experts_per_tok"]
        self.n_group = cfg["n_group"]
        self.topk_group = cfg["topk_group"]
        self.norm_topk_prob = cfg["norm_topk_prob"]
        self.scaling = cfg["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg["hidden_size"]))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (scores [N, E] fp32, top-k indices [N, K], top-k weights [N, K] fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        n = choice.shape[0]
        group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, self.n_experts // self.n_group)
        choice = choice.masked_fill(~score_mask.reshape(n, -1).bool(), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, w * self.scaling


class Experts(nn.Module):
    """256 SwiGLU experts held stacked; computed as one padded batched matmul."""

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n_tok, k = idx.shape
        n_exp = self.gate_proj.shape[0]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        e_sorted = flat[order]
        counts = torch.bincount(flat, minlength=n_exp)
        starts = torch.cumsum(counts, 0) - counts
        cap = int(counts.max().item())
        cap = max(8, (cap + 7) // 8 * 8)
        pos = torch.arange(order.numel(), device=x.device) - starts[e_sorted]
        slot = e_sorted * cap + pos
        tok = order // k
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x[tok].to(dtype)
        buf = xs.new_zeros(n_exp * cap, x.shape[-1]).index_copy(0, slot, xs).view(n_exp, cap, -1)
        g = torch.bmm(buf, self.gate_proj.to(dtype).transpose(1, 2))
        u = torch.bmm(buf, self.up_proj.to(dtype).transpose(1, 2))
        y = torch.bmm(F.silu(g) * u, self.down_proj.to(dtype).transpose(1, 2))
        y = y.reshape(n_exp * cap, -1)[slot]
        y = y.float() * w.reshape(-1)[order, None]
        return torch.zeros(n_tok, x.shape[-1], device=x.device, dtype=torch.float32).index_add(0, tok, y)


class MoE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.gate = Gate(cfg)
        self.experts = Experts(cfg["n_routed_experts"], h, inter)
        self.shared_experts = MLP(h, inter * cfg["n_shared_experts"])
        self.last_stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        scores, idx, w = self.gate(flat)
        routed = self.experts(flat, idx, w).view(b, t, h)
        if self.training:
            n_exp, k = scores.shape[-1], idx.shape[-1]
            load = torch.bincount(idx.reshape(-1), minlength=n_exp).float()
            # sequence-wise balance loss: sum_i f_i * P_i per sequence, averaged over sequences
            onehot = torch.zeros(b, t * k, n_exp, device=x.device).scatter_(2, idx.view(b, t * k, 1), 1.0)
            f = onehot.sum(1) * (n_exp / (k * t))
            p = (scores / scores.sum(-1, keepdim=True)).view(b, t, n_exp).mean(1)
            self.last_stats = RouterStats(load=load, balance_loss=(f * p).sum(-1).mean())
        return (routed + self.shared_experts(x).float()).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.self_attn = Attention(cfg)
        if layer_idx >= cfg["first_k_dense_replace"]:
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = MLP(cfg["hidden_size"], cfg["intermediate_size"])
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class MTPLayer(DecoderLayer):
    """The MTP module: its own enorm/hnorm/eh_proj, one MoE decoder block and shared_head.norm."""

    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__(cfg, layer_idx)
        h = cfg["hidden_size"]
        self.enorm = RMSNorm(h, cfg["rms_norm_eps"])
        self.hnorm = RMSNorm(h, cfg["rms_norm_eps"])
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(cfg)

    def mtp_forward(self, h_main: torch.Tensor, next_emb: torch.Tensor, cos, sin) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h_main)], dim=-1))
        x = DecoderLayer.forward(self, x, cos, sin)
        return self.shared_head.norm(x)


class Backbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        n = cfg["num_hidden_layers"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(n)]
        layers += [MTPLayer(cfg, n + j) for j in range(cfg["num_nextn_predict_layers"])]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class DeepseekV3(nn.Module):
    """Main model + ``num_nextn_predict_layers`` (must be 1) MTP module."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg["num_nextn_predict_layers"] != 1:
            raise ValueError("num_nextn_predict_layers must be 1")
        if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError("only scoring_func sigmoid with topk_method noaux_tc is supported")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    @property
    def n_main(self) -> int:
        return self.cfg["num_hidden_layers"]

    @property
    def mtp(self) -> MTPLayer:
        return self.model.layers[self.n_main]  # type: ignore[return-value]

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std = self.cfg["initializer_range"]
        out_std = std / math.sqrt(2 * (self.n_main + 1))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()

    def moe_layers(self, include_mtp: bool = True) -> list[MoE]:
        layers = list(self.model.layers) if include_mtp else list(self.model.layers[: self.n_main])
        return [lay.mlp for lay in layers if isinstance(lay.mlp, MoE)]

    def forward_main(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> final hidden state after the final norm [B, T, H]."""
        cos, sin = rope_cos_sin(self.cfg, ids.shape[1], ids.device)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers[: self.n_main]:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward_mtp(self, h: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP hidden (after shared_head.norm) at position i from h_i and token t_{i+1}."""
        cos, sin = rope_cos_sin(self.cfg, next_ids.shape[1], next_ids.device)
        return self.mtp.mtp_forward(h, self.model.embed_tokens(next_ids), cos, sin)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
