"""Export and load DeepSeek-V3 Hugging Face-format checkpoints (``config.json`` + safetensors).

Tensor names are DeepSeek's: per-expert ``model.layers.{l}.mlp.experts.{i}.{gate,up,down}_proj.weight``,
``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.shared_experts.*``, MLA
``self_attn.*``, and the MTP module at layer index ``num_hidden_layers`` with ``enorm``, ``hnorm``,
``eh_proj``, ``shared_head.norm``, ``shared_head.head`` and ``embed_tokens`` (the last two are copies
of ``lm_head`` and ``model.embed_tokens``, stored as DeepSeek's release stores them).

With ``fp8=True`` the tensors selected by :func:`fp8.is_fp8_weight` are written as float8_e4m3fn
plus ``<name>_scale_inv`` and ``config.json`` carries DeepSeek's ``quantization_config``; other
tensors are bf16 (``e_score_correction_bias`` float32). With ``fp8=False`` every tensor is written in
``dtype`` and ``quantization_config`` is omitted (a plain checkpoint any loader reads).

Files larger than ``max_shard_bytes`` are split into ``model-0000k-of-0000n.safetensors`` with a
``model.safetensors.index.json`` (Hugging Face sharded layout); otherwise ``model.safetensors``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fp8
from dsv3 import DeepseekV3

EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def hf_tensors(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Model state -> DeepSeek-named float32 tensors (CPU), in a stable order."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        m = EXPERT_RE.match(name)
        if m:
            for i in range(t.shape[0]):
                out[f"{m.group(1)}.{i}.{m.group(2)}.weight"] = t[i].contiguous()
        else:
            out[name] = t.contiguous()
    mtp = f"model.layers.{cfg['num_hidden_layers']}"
    out[f"{mtp}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    out[f"{mtp}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return dict(sorted(out.items(), key=lambda kv: _order_key(kv[0])))


def _order_key(name: str) -> tuple:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if name == "model.embed_tokens.weight":
        return (0, 0, "", 0, "")
    if m:
        rest = m.group(2)
        e = re.match(r"mlp\.experts\.(\d+)\.(.*)", rest)
        if e:
            return (1, int(m.group(1)), "mlp.experts", int(e.group(1)), e.group(2))
        return (1, int(m.group(1)), rest, -1, "")
    return (2, 0, name, 0, "")


def to_storage(tensors: dict[str, torch.Tensor], use_fp8: bool, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Float tensors -> stored tensors (FP8 + scale_inv where DeepSeek quantizes, else bf16/f32)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = t.float().contiguous()
        elif use_fp8 and fp8.is_fp8_weight(name):
            q, s = fp8.quantize(t)
            out[name] = q
            out[name + "_scale_inv"] = s
        else:
            out[name] = t.to(dtype).contiguous()
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write(out_dir: Path, cfg: dict, stored: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """Write config.json and the safetensors file(s); returns the weight files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        old.unlink()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {"format": "pt"}
    # ~ header bytes per tensor (name + dtype + shape + offsets in JSON)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in stored.items():
        b = _nbytes(t) + len(name) + 64
        if shards[-1] and size + b > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += b
    files: list[Path] = []
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    weight_map = {}
    n = len(shards)
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        files.append(out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(_nbytes(t) for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def export(model: DeepseekV3, out_dir: Path, use_fp8: bool, max_shard_bytes: int,
           dtype=torch.bfloat16) -> list[Path]:
    cfg = dict(model.cfg)
    if use_fp8:
        cfg["torch_dtype"] = "bfloat16"
    else:
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    stored = to_storage(hf_tensors(model), use_fp8, dtype)
    return write(out_dir, cfg, stored, max_shard_bytes)


def read_stored(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(ckpt_dir / f)))
    return out


def dequantized(stored: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Stored tensors -> plain tensors: FP8 weights times their block scale_inv; others cast."""
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = stored.get(name + "_scale_inv")
            if s is None:
                raise ValueError(f"{name} is float8 but {name}_scale_inv is missing")
            out[name] = fp8.dequantize(t, s, dtype)
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(dtype)
    return out


def load_config(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "config.json").read_text())


def load_model(ckpt_dir: Path, device="cpu") -> DeepseekV3:
    """Load a checkpoint (FP8 or plain) into the training module, dequantized to float32."""
    cfg = load_config(ckpt_dir)
    tensors = dequantized(read_stored(ckpt_dir))
    model = DeepseekV3(cfg)
    n = cfg["num_hidden_layers"]
    mtp = f"model.layers.{n}"
    for dup, main in ((f"{mtp}.embed_tokens.weight", "model.embed_tokens.weight"),
                      (f"{mtp}.shared_head.head.weight", "lm_head.weight")):
        if dup not in tensors:
            raise ValueError(f"checkpoint {ckpt_dir} lacks {dup}")
        if not torch.equal(tensors.pop(dup), tensors[main]):
            raise ValueError(f"{dup} differs from {main}: the training module shares them")
    state = {}
    expert_parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            expert_parts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            state[name] = t
    for (prefix, proj), parts in expert_parts.items():
        state[f"{prefix}.{proj}"] = torch.stack([parts[i] for i in range(len(parts))])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device)
