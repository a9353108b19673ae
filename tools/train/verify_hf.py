#!/usr/bin/env python3
"""Check that a checkpoint loads in Hugging Face ``DeepseekV3ForCausalLM`` with the training
module's logits.

1. The FP8 checkpoint is dequantized to float32 (``dequantize.py``) and loaded by transformers in
   float32 with eager attention; the training module loads the same FP8 checkpoint (dequantized on
   load). Both run the same held-out window in float32 (TF32 off); the report gives the largest
   absolute logit difference and the greedy-token agreement.
2. Optionally (``--native-fp8``, CUDA only) the FP8 checkpoint is loaded as it is, through
   transformers' own fine-grained FP8 path (which also quantizes activations per 1×128 tile), and
   compared the same way; this difference is expected to be larger and is reported, not asserted.

``python3 tools/train/verify_hf.py --ckpt models/tiny-v1 --data-dir tools/train/work/data``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checkpoint  # noqa: E402
from dequantize import dequantize_dir  # noqa: E402


@torch.no_grad()
def compare(ckpt: Path, tokens: np.ndarray, seq: int, batch: int, device, native_fp8: bool) -> dict:
    from transformers import DeepseekV3ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = torch.from_numpy(tokens[: batch * seq].reshape(batch, seq)).to(device)
    ours = checkpoint.load_model(ckpt, device).eval()
    ref = ours.logits(ours.forward_main(ids)).float()
    out: dict = {"tokens": int(ids.numel())}
    with tempfile.TemporaryDirectory() as tmp:
        dequantize_dir(ckpt, Path(tmp), "float32")
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
        hf = hf.to(device).eval()
        got = hf(ids).logits.float()
        out["dequantized_fp32"] = {
            "max_abs_diff": (got - ref).abs().max().item(),
            "max_abs_logit": ref.abs().max().item(),
            "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        }
        del hf
    if native_fp8 and device.type == "cuda":
        try:
            hf8 = DeepseekV3ForCausalLM.from_pretrained(str(ckpt), device_map={"": device.index or 0})
            got = hf8(ids).logits.float()
            out["native_fp8"] = {
                "max_abs_diff": (got - ref).abs().max().item(),
                "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "weight_dtypes": sorted({str(p.dtype) for p in hf8.parameters()}),
            }
        except Exception as e:  # reported: transformers' FP8 path is optional for this check
            out["native_fp8"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=HERE / "work/data")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--native-fp8", action="store_true")
    a = ap.parse_args()
    toks = np.fromfile(sorted(a.data_dir.glob("heldout_*.bin"))[0], dtype=np.uint16).astype(np.int64)
    print(json.dumps(compare(a.ckpt, toks, a.seq, a.batch, torch.device(a.device), a.native_fp8), indent=1))


if __name__ == "__main__":
    main()
