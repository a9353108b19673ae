#!/usr/bin/env python3
"""Dequantize a DeepSeek-V3 FP8 checkpoint (128×128 block ``weight_scale_inv``) to bf16 or fp32.

``python3 tools/train/dequantize.py models/tiny-v1 /tmp/tiny-v1-bf16 [--dtype float32]``

Every float8_e4m3fn tensor ``W`` is replaced by ``W * scale_inv`` (block-wise) and its
``_scale_inv`` companion dropped; other tensors are cast (``e_score_correction_bias`` stays
float32); ``quantization_config`` is removed from ``config.json``; tokenizer files are copied.
The output loads in any DeepSeek-V3 loader without FP8 support.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoint  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def dequantize_dir(src: Path, dst: Path, dtype_name: str = "bfloat16", max_shard_bytes: int = 1 << 40) -> None:
    dtype = DTYPES[dtype_name]
    cfg = checkpoint.load_config(src)
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = dtype_name
    plain = checkpoint.dequantized(checkpoint.read_stored(src), dtype)
    checkpoint.write(dst, cfg, plain, max_shard_bytes)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    a = ap.parse_args()
    dequantize_dir(a.src, a.dst, a.dtype)
    print(json.dumps({"src": str(a.src), "dst": str(a.dst), "dtype": a.dtype}))


if __name__ == "__main__":
    main()
