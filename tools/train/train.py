#!/usr/bin/env python3
"""Train pdserve's tiny DeepSeek-V3 checkpoint (with MTP) on one CUDA GPU, export it in
DeepSeek's FP8 format and evaluate it.

Phases (each timed; metrics go to ``<out>/train_log.jsonl``, figures to ``<out>/results.json``):

1. joint: ``CE(main, t+1) + mtp_weight * CE(MTP, t+2) + bal_alpha * sum(sequence-wise balance
   loss)`` with aux-loss-free balancing (after every step, per router,
   ``bias += bias_update * sign(mean_load - load)``); AdamW, warm-up then cosine decay; the
   weights with the best held-out main loss are kept.
2. distill: the main model (embedding and head included) is frozen; only the MTP module trains,
   on ``KL(p_main(.|x<=i+1) || q_MTP(.|h_i, x_{i+1}))``; its router keeps balancing.
3. export: FP8 (e4m3, 128×128 ``weight_scale_inv``) checkpoint into ``--model-dir``; a bf16
   reference copy into ``<out>/bf16``.
4. eval: held-out perplexity and greedy MTP acceptance for the bf16 copy and for the FP8
   checkpoint (dequantized), seeded samples, and the transformers logit check.

Seeds are fixed (``--seed``): initialisation, batch sampling, evaluation prefixes, samples.
GPU kernels (index_add, attention backward) are not bitwise deterministic.

Device command: ``bash tools/train/run_device.sh`` (see docs/training.md). CPU smoke test:
``python3 tools/train/train.py --smoke --device cpu --out /tmp/smoke --model-dir /tmp/smoke/ckpt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import traceback
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import checkpoint  # noqa: E402
import evaluate as ev  # noqa: E402
from dsv3 import DeepseekV3, tiny_v1_config  # noqa: E402

T_START = time.perf_counter()


def smoke_config() -> dict:
    cfg = tiny_v1_config()
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 16, "n_routed_experts": 32,
                "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "num_hidden_layers": 2,
                "first_k_dense_replace": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                "q_lora_rank": 32, "kv_lora_rank": 16})
    return cfg


class Logger:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, **rec) -> None:
        rec = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()}
        line = json.dumps(rec, ensure_ascii=False)
        self.f.write(line + "\n")
        self.f.flush()
        print(line, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


def batches(tokens: torch.Tensor, batch: int, width: int, gen: torch.Generator):
    hi = tokens.numel() - width
    offs = torch.arange(width, device=tokens.device)
    while True:
        starts = torch.randint(0, hi, (batch,), generator=gen).to(tokens.device)
        yield tokens[starts[:, None] + offs]


def param_groups(params: list[tuple[str, torch.nn.Parameter]], wd: float) -> list[dict]:
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def update_bias(moes, rate: float) -> float:
    """Aux-loss-free balancing step; returns the mean MaxVio (max load / mean load - 1)."""
    vio = []
    with torch.no_grad():
        for m in moes:
            load = m.last_stats.load
            mean = load.mean()
            m.gate.e_score_correction_bias += rate * torch.sign(mean - load)
            vio.append(load.max() / mean - 1)
    return torch.stack(vio).mean().item() if vio else 0.0


def quick_eval(model: DeepseekV3, sets, seq: int, batch: int, device) -> dict:
    r = ev.perplexity_all(model, sets, seq, batch, device, amp=device.type == "cuda")
    model.train()
    return {"held_ppl": r["all"]["ppl"], "held_mtp_ppl": r["all"]["mtp_ppl"],
            **{f"held_ppl_{k}": v["ppl"] for k, v in r.items() if k != "all"}}


def fit_steps(a, done: int, step_s: float, log) -> None:
    """Shrink the remaining joint and distill steps proportionally if the projected run would
    pass ``--deadline-s`` (measured from process start); logged as ``budget_cut``."""
    now = time.perf_counter() - T_START
    rest = (a.steps - done) * step_s + a.distill_steps * step_s * a.distill_cost
    room = a.deadline_s - now - a.reserve_s
    if rest <= room:
        log(phase="budget_ok", projected_s=now + rest + a.reserve_s, step_s=step_s)
        return
    f = max(0.0, room / rest)
    old = (a.steps, a.distill_steps)
    a.steps = done + int((a.steps - done) * f)
    a.distill_steps = max(1, int(a.distill_steps * f))
    log(phase="budget_cut", step_s=step_s, old_steps=old, new_steps=(a.steps, a.distill_steps))


def joint_phase(model, a, train_tokens, sets, device, log) -> tuple[dict, dict]:
    moes = model.moe_layers()
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters()), a.wd), lr=a.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(a.seed + 1)
    it = batches(train_tokens, a.batch, a.seq + 2, gen)
    best = {"held_ppl": float("inf"), "step": -1}
    best_state = None
    model.train()
    t0 = time.perf_counter()
    tok_count = 0
    step = 0
    while step < a.steps:
        lr = lr_at(step, a.steps, a.lr, a.min_lr, a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(it)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = model.forward_main(x[:, :-2])
            main_ce = F.cross_entropy(model.logits(h).float().flatten(0, 1), x[:, 1:-1].flatten())
            hm = model.forward_mtp(h, x[:, 1:-1])
            mtp_ce = F.cross_entropy(model.logits(hm).float().flatten(0, 1), x[:, 2:].flatten())
            bal = torch.stack([m.last_stats.balance_loss for m in moes]).sum()
            loss = main_ce + a.mtp_weight * mtp_ce + a.bal_alpha * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        maxvio = update_bias(moes, a.bias_update)
        tok_count += x[:, :-2].numel()
        if step == a.budget_probe_steps - 1 and a.deadline_s > 0:
            sync(device)
            fit_steps(a, step + 1, (time.perf_counter() - t0) / (step + 1), log)
        if step % a.log_every == 0 or step == a.steps - 1:
            sync(device)
            el = time.perf_counter() - t0
            log(phase="joint", step=step, loss=loss.item(), main_ce=main_ce.item(), mtp_ce=mtp_ce.item(),
                bal=bal.item(), maxvio=maxvio, gnorm=gnorm.item(), lr=lr, elapsed_s=el, tok_per_s=tok_count / el)
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            r = quick_eval(model, sets, a.seq, a.eval_batch, device)
            log(phase="joint_eval", step=step + 1, **r)
            if r["held_ppl"] < best["held_ppl"]:
                best = {"step": step + 1, **r}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        step += 1
    sync(device)
    wall = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return best, {"wall_s": wall, "steps": a.steps, "tokens": tok_count, "tok_per_s": tok_count / wall,
                  "peak_gib": peak}


def distill_phase(model, a, train_tokens, sets, device, log) -> tuple[dict, dict]:
    mtp = model.mtp
    for p in model.parameters():
        p.requires_grad_(False)
    for p in mtp.parameters():
        p.requires_grad_(True)
    moes = [mtp.mlp]
    opt = torch.optim.AdamW(param_groups(list(mtp.named_parameters()), a.wd), lr=a.distill_lr,
                            betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(a.seed + 2)
    it = batches(train_tokens, a.batch, a.seq + 1, gen)
    model.train()
    best = {"held_mtp_ppl": float("inf"), "step": 0}
    best_state = {k: v.detach().clone() for k, v in mtp.state_dict().items()}
    t0 = time.perf_counter()
    for step in range(a.distill_steps):
        lr = lr_at(step, a.distill_steps, a.distill_lr, a.distill_lr * 0.1, a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(it)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                h = model.forward_main(x)
                teacher = F.log_softmax(model.logits(h[:, 1:]).float(), -1)
            hm = model.forward_mtp(h[:, :-1], x[:, 1:])
            student = F.log_softmax(model.logits(hm).float(), -1)
            kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), a.clip)
        opt.step()
        maxvio = update_bias(moes, a.bias_update)
        if step % a.log_every == 0 or step == a.distill_steps - 1:
            sync(device)
            log(phase="distill", step=step, kl=kl.item(), maxvio=maxvio, lr=lr,
                elapsed_s=time.perf_counter() - t0)
        if (step + 1) % a.eval_every == 0 or step == a.distill_steps - 1:
            r = quick_eval(model, sets, a.seq, a.eval_batch, device)
            log(phase="distill_eval", step=step + 1, **r)
            if r["held_mtp_ppl"] < best["held_mtp_ppl"]:
                best = {"step": step + 1, **r}
                best_state = {k: v.detach().clone() for k, v in mtp.state_dict().items()}
    sync(device)
    wall = time.perf_counter() - t0
    mtp.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    return best, {"wall_s": wall, "steps": a.distill_steps, "tokens": a.distill_steps * a.batch * a.seq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=HERE / "work/data")
    ap.add_argument("--model-dir", type=Path, default=REPO / "models/tiny-v1")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "work/run")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny model and few steps (CPU test)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bal-alpha", type=float, default=1e-4)
    ap.add_argument("--bias-update", type=float, default=1e-3)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-shard-mib", type=float, default=15.0)
    ap.add_argument("--n-prefix", type=int, default=1024)
    ap.add_argument("--n-greedy", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "models/tiny-v1/tokenizer.json")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="if > 0, shrink step counts so the run ends by then (seconds from start)")
    ap.add_argument("--reserve-s", type=float, default=150.0, help="time kept for export and evaluation")
    ap.add_argument("--budget-probe-steps", type=int, default=40)
    ap.add_argument("--distill-cost", type=float, default=0.7, help="distill step time / joint step time")
    a = ap.parse_args()

    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    log = Logger(a.out / "train_log.jsonl")
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = smoke_config() if a.smoke else tiny_v1_config()
    meta = json.loads((a.data_dir / "meta.json").read_text())
    if meta["vocab_size"] != cfg["vocab_size"]:
        raise SystemExit(f"data vocab {meta['vocab_size']} != config vocab_size {cfg['vocab_size']}")
    train_tokens = torch.from_numpy(ev.load_tokens(a.data_dir / "train.bin")).to(device)
    sets = ev.heldout_sets(a.data_dir)
    if a.smoke:
        sets = {k: v[: 4 * a.seq + 1] for k, v in sets.items()}

    model = DeepseekV3(cfg)
    model.init_weights(a.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in model.mtp.parameters())
    log(phase="setup", device=str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
        torch=torch.__version__, params=n_params, mtp_params=n_mtp, train_tokens=int(train_tokens.numel()),
        heldout_tokens={k: int(v.size) for k, v in sets.items()}, args={k: str(v) for k, v in vars(a).items()})

    results: dict = {"config": cfg, "params": n_params, "mtp_params": n_mtp, "timing": {}}
    best, timing = joint_phase(model, a, train_tokens, sets, device, log)
    results["joint_best"], results["timing"]["joint"] = best, timing

    n_prefix, n_greedy = (a.n_prefix, a.n_greedy) if not a.smoke else (16, 2)
    allt = np.concatenate(list(sets.values()))

    def acceptance(m: DeepseekV3) -> dict:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        m.eval()
        r = {"accept_prefixes": ev.accept_on_prefixes(m, allt, n_prefix, 16, 256, a.seed, 64, device),
             "accept_greedy": ev.accept_on_greedy(m, allt, n_greedy, 64, 128, a.seed + 1, device)}
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return r

    stage(results, "joint_acceptance", lambda: acceptance(model), log)

    best, timing = distill_phase(model, a, train_tokens, sets, device, log)
    results["distill_best"], results["timing"]["distill"] = best, timing

    t0 = time.perf_counter()
    model.eval()
    shard = int(a.max_shard_mib * 2**20)
    files = checkpoint.export(model, a.model_dir, True, shard)
    bf16_dir = Path(tempfile.mkdtemp(prefix="tiny-v1-bf16-"))
    checkpoint.export(model, bf16_dir, False, 1 << 40, torch.bfloat16)
    results["timing"]["export_s"] = time.perf_counter() - t0
    results["files"] = {f.name: f.stat().st_size for f in files}

    torch.backends.cuda.matmul.allow_tf32 = False
    for tag, src in (("bf16", bf16_dir), ("fp8", a.model_dir)):
        def report(tag=tag, src=src) -> dict:
            m = checkpoint.load_model(src, device).eval()
            r = ev.full_report(m, sets, a.seq, a.eval_batch, device, a.seed, n_prefix, n_greedy)
            if tag == "fp8":
                r["samples"] = ev.samples(m, a.tokenizer, device, n_new=20 if a.smoke else 80)
            return r

        stage(results, tag, report, log)
    if not a.skip_hf:
        import verify_hf

        held = np.concatenate(list(sets.values()))
        stage(results, "hf_check", lambda: verify_hf.compare(a.model_dir, held, min(256, a.seq), 4, device,
                                                             native_fp8=device.type == "cuda"), log)
    shutil.rmtree(bf16_dir, ignore_errors=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    log(phase="done", timing=results["timing"])


def stage(results: dict, name: str, fn, log) -> None:
    """Run one evaluation stage; a failure is recorded in the results instead of ending the run."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # keep the checkpoint and the other figures
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    results["timing"][f"{name}_s"] = time.perf_counter() - t0
    log(phase=f"final_{name}", **results[name])


if __name__ == "__main__":
    main()
