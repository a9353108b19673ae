"""Block-wise FP8 (e4m3) weight quantization exactly as DeepSeek-V3's released checkpoints store it.

A quantized 2-D weight ``W [out, in]`` is stored as ``<name>`` in ``float8_e4m3fn`` plus
``<name>_scale_inv`` in float32 of shape ``[ceil(out/128), ceil(in/128)]``; dequantization is
``W ≈ fp8 * scale_inv`` per 128×128 block (edge blocks are partial). ``scale_inv = amax / 448``
where ``amax`` is the block's largest magnitude, so every block uses the full e4m3 range.

Which tensors are FP8 follows the release: every linear weight of attention (``q_a_proj``,
``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) and of the MLPs (dense MLP,
routed experts, shared experts). Everything else stays as released: embeddings, ``lm_head``,
``shared_head.head``, all norms, the router ``mlp.gate.weight`` and the MTP ``eh_proj`` in
bfloat16, ``e_score_correction_bias`` in float32.
"""

from __future__ import annotations

import re

import torch

BLOCK = 128
E4M3_MAX = 448.0
_FP8_RE = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$"
)


def is_fp8_weight(name: str) -> bool:
    """True for the tensor names DeepSeek-V3 stores in FP8 with a ``_scale_inv`` companion."""
    return _FP8_RE.search(name) is not None


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK), -(-cols // BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (fp8 e4m3 [out, in], scale_inv float32 [bo, bi])."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    br, bc = _blocks(rows, cols)
    padded = torch.zeros(br * BLOCK, bc * BLOCK, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, BLOCK, bc, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.view(br * BLOCK, bc * BLOCK)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """fp8 [out, in] and scale_inv [ceil(out/128), ceil(in/128)] -> weight in ``dtype``."""
    rows, cols = q.shape
    br, bc = _blocks(rows, cols)
    if tuple(scale_inv.shape) != (br, bc):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {rows}x{cols}")
    s = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (q.float() * s).to(dtype)
