#!/usr/bin/env python3
"""CPU throughput of Hugging Face transformers' DeepSeek model on a checkpoint, for comparison with
pdserve at the same thread count.

Loads ``--checkpoint`` (HF format: config.json + *.safetensors with DeepSeek tensor names; e.g. the
output of ``pdserve model init`` or a golden under crates/model/tests/goldens) with
``AutoModelForCausalLM`` (``DeepseekV3ForCausalLM`` for ``model_type`` deepseek_v3), sets
``torch.set_num_threads(--threads)``, and for each batch size:

* prefill: one forward over ``batch x prompt_len`` random prompt tokens (no padding) that fills the
  KV cache; ``prefill_tokens_per_s = batch * prompt_len / seconds``;
* decode: ``decode_steps`` greedy steps, one token per sequence per step, with the KV cache;
  ``decode_tokens_per_s = batch * decode_steps / seconds``, plus per-step latency.

Every measurement is preceded by ``--warmup`` untimed runs of the same shape and repeated
``--repeats`` times; the median repeat is reported. Output is one JSON object on stdout (and in
``--out`` if given). MTP is not used (plain decoding).

Usage::

    python tools/bench/transformers_bench.py --checkpoint DIR --threads 2 \
        [--batch-sizes 1,32,64,256] [--prompt-len 128] [--decode-steps 16] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="transformers DeepSeek CPU prefill/decode throughput")
    ap.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint dir (config.json + safetensors)")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads (torch.set_num_threads)")
    ap.add_argument("--batch-sizes", default="1,32,64,256", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--decode-steps", type=int, default=16, help="greedy decode steps per sequence")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before measuring each shape")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per shape; the median is reported")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    ap.add_argument("--experts", default="grouped_mm", help="transformers experts_implementation (grouped_mm, batched_mm, eager)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random prompt tokens")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.prompt_len < 1 or args.decode_steps < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--threads, --prompt-len, --decode-steps, --repeats must be >= 1 and --warmup >= 0")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--batch-sizes needs at least one batch size >= 1")
    if not (args.checkpoint / "config.json").is_file():
        ap.error(f"{args.checkpoint}/config.json not found")
    return args


@torch.inference_mode()
def prefill(model, prompts: torch.Tensor):
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompts, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1, :]


@torch.inference_mode()
def decode(model, cache, last_logits: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
    step_s = []
    tokens = []
    nxt = last_logits.argmax(dim=-1, keepdim=True)
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        step_s.append(time.perf_counter() - t0)
        tokens.append(nxt)
        cache = out.cache
    return step_s, torch.cat(tokens, dim=1)


def measure(model, batch: int, args, vocab: int) -> dict:
    rng = np.random.default_rng([args.seed, batch])
    prompts = torch.from_numpy(rng.integers(2, vocab, size=(batch, args.prompt_len))).long()
    prefill_s, decode_s, step_all = [], [], []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        cache, last = prefill(model, prompts)
        t1 = time.perf_counter()
        steps, _ = decode(model, cache, last, args.decode_steps)
        if i >= args.warmup:
            prefill_s.append(t1 - t0)
            decode_s.append(sum(steps))
            step_all.extend(steps)
    p_s = statistics.median(prefill_s)
    d_s = statistics.median(decode_s)
    step_ms = sorted(s * 1e3 for s in step_all)
    return {
        "batch_size": batch,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "prefill_tokens": batch * args.prompt_len,
        "prefill_s": round(p_s, 6),
        "prefill_tokens_per_s": round(batch * args.prompt_len / p_s, 2),
        "decode_tokens": batch * args.decode_steps,
        "decode_s": round(d_s, 6),
        "decode_tokens_per_s": round(batch * args.decode_steps / d_s, 2),
        "decode_step_ms_mean": round(statistics.fmean(step_ms), 4),
        "decode_step_ms_p50": round(step_ms[len(step_ms) // 2], 4),
        "decode_step_ms_p90": round(step_ms[min(len(step_ms) - 1, int(len(step_ms) * 0.9))], 4),
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint,
        dtype=DTYPES[args.dtype],
        attn_implementation=args.attn,
        experts_implementation=args.experts,
    ).eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    results = []
    for b in args.batch_sizes:
        r = measure(model, b, args, cfg.vocab_size)
        print(
            f"batch {b:4d}: prefill {r['prefill_tokens_per_s']:10.1f} tok/s, decode {r['decode_tokens_per_s']:10.1f} tok/s "
            f"(step p50 {r['decode_step_ms_p50']:.2f} ms)",
            file=sys.stderr,
        )
        results.append(r)
    report = {
        "engine": "transformers",
        "model_class": type(model).__name__,
        "checkpoint": str(args.checkpoint),
        "threads": args.threads,
        "torch_num_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "attn_implementation": cfg._attn_implementation,
        "experts_implementation": cfg._experts_implementation,
        "mtp": False,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": __import__("os").cpu_count()},
        "model": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "n_routed_experts": getattr(cfg, "n_routed_experts", None),
            "num_experts_per_tok": getattr(cfg, "num_experts_per_tok", None),
        },
        "load_s": round(load_s, 3),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
