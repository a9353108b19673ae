#!/usr/bin/env python3
"""Evaluate a DeepSeek-V3 checkpoint with the training module: held-out perplexity, greedy MTP
acceptance, and seeded samples.

Definitions (pdserve's engine measures its own figures later; these are the Python references):

* Perplexity: ``exp`` of the mean next-token cross-entropy over every held-out token, the stream
  cut into consecutive windows of ``seq`` predicted tokens (no overlap, each window starts cold).
* MTP acceptance on held-out prefixes: for a random held-out prefix ``x≤i`` the main model's greedy
  token is ``g``; the MTP module drafts ``d = argmax MTP(h_i, g)``; the draft is accepted when ``d``
  equals the main model's greedy token after ``x≤i, g`` (computed exactly, by a second pass).
* MTP acceptance along greedy continuations: the main model continues held-out prompts greedily;
  at every generated position the MTP draft is compared with the next greedy token.
* Samples: temperature sampling with a fixed torch generator seed per prompt.

CLI: ``python3 tools/train/evaluate.py --ckpt models/tiny-v1 --data-dir tools/train/work/data``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dsv3 import DeepseekV3  # noqa: E402


def load_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16).astype(np.int64)


def heldout_sets(data_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem[len("heldout_"):]: load_tokens(p) for p in sorted(data_dir.glob("heldout_*.bin"))}


@torch.no_grad()
def perplexity(model: DeepseekV3, tokens: np.ndarray, seq: int, batch: int, device,
               amp: bool = False) -> dict:
    """Main and MTP cross-entropy / top-1 accuracy over the whole token stream."""
    model.eval()
    t = torch.from_numpy(tokens).to(device)
    n_win = (t.numel() - 1) // seq
    starts = [i * seq for i in range(n_win)]
    tail = t.numel() - 1 - n_win * seq
    sums = {"main_nll": 0.0, "main_n": 0, "main_hit": 0, "mtp_nll": 0.0, "mtp_n": 0, "mtp_hit": 0}

    def run(x: torch.Tensor) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            h = model.forward_main(x[:, :-1])
            logits = model.logits(h).float()
            y = x[:, 1:]
            sums["main_nll"] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            sums["main_hit"] += (logits.argmax(-1) == y).sum().item()
            sums["main_n"] += y.numel()
            if x.shape[1] >= 3:
                hm = model.forward_mtp(h[:, :-1], x[:, 1:-1])
                ml = model.logits(hm).float()
                y2 = x[:, 2:]
                sums["mtp_nll"] += F.cross_entropy(ml.flatten(0, 1), y2.flatten(), reduction="sum").item()
                sums["mtp_hit"] += (ml.argmax(-1) == y2).sum().item()
                sums["mtp_n"] += y2.numel()

    for i in range(0, len(starts), batch):
        x = torch.stack([t[s: s + seq + 1] for s in starts[i: i + batch]])
        run(x)
    if tail >= 1:
        run(t[n_win * seq:].unsqueeze(0))
    main = sums["main_nll"] / sums["main_n"]
    out = {"tokens": sums["main_n"], "nll": main, "ppl": math.exp(main),
           "top1": sums["main_hit"] / sums["main_n"]}
    if sums["mtp_n"]:
        out.update({"mtp_nll": sums["mtp_nll"] / sums["mtp_n"], "mtp_ppl": math.exp(sums["mtp_nll"] / sums["mtp_n"]),
                    "mtp_top1": sums["mtp_hit"] / sums["mtp_n"]})
    return out


def perplexity_all(model: DeepseekV3, sets: dict[str, np.ndarray], seq: int, batch: int, device,
                   amp: bool = False) -> dict:
    res = {name: perplexity(model, toks, seq, batch, device, amp) for name, toks in sets.items()}
    n = sum(r["tokens"] for r in res.values())
    nll = sum(r["nll"] * r["tokens"] for r in res.values()) / n
    mtp = sum(r["mtp_nll"] * r["tokens"] for r in res.values()) / n
    res["all"] = {"tokens": n, "nll": nll, "ppl": math.exp(nll), "mtp_nll": mtp, "mtp_ppl": math.exp(mtp),
                  "top1": sum(r["top1"] * r["tokens"] for r in res.values()) / n}
    return res


@torch.no_grad()
def accept_on_prefixes(model: DeepseekV3, tokens: np.ndarray, n: int, min_len: int, max_len: int,
                       seed: int, batch: int, device) -> dict:
    """Exact greedy MTP acceptance on ``n`` random held-out prefixes (two passes per batch)."""
    model.eval()
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, n)
    starts = rng.integers(0, len(tokens) - max_len - 2, n)
    t = torch.from_numpy(tokens).to(device)
    accepted = 0
    for i in range(0, n, batch):
        ls = lens[i: i + batch]
        ss = starts[i: i + batch]
        width = int(ls.max()) + 1
        ids = torch.zeros(len(ls), width, dtype=torch.long, device=device)
        for j, (s, l) in enumerate(zip(ss, ls)):
            ids[j, :l] = t[s: s + l]
        rows = torch.arange(len(ls), device=device)
        last = torch.as_tensor(ls - 1, device=device)
        g = model.logits(model.forward_main(ids)[rows, last]).argmax(-1)
        ids[rows, last + 1] = g
        h = model.forward_main(ids)
        v = model.logits(h[rows, last + 1]).argmax(-1)
        hm = model.forward_mtp(h[:, :-1], ids[:, 1:])
        d = model.logits(hm[rows, last]).argmax(-1)
        accepted += (d == v).sum().item()
    return {"prefixes": int(n), "accept": accepted / n}


@torch.no_grad()
def greedy(model: DeepseekV3, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    model.eval()
    for _ in range(n_new):
        nxt = model.logits(model.forward_main(ids)[:, -1]).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@torch.no_grad()
def accept_on_greedy(model: DeepseekV3, tokens: np.ndarray, n: int, prompt_len: int, n_new: int,
                     seed: int, device) -> dict:
    """MTP acceptance along the main model's own greedy continuations of held-out prompts."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - prompt_len - 1, n)
    t = torch.from_numpy(tokens).to(device)
    ids = torch.stack([t[s: s + prompt_len] for s in starts])
    seq = greedy(model, ids, n_new)
    h = model.forward_main(seq)
    hm = model.forward_mtp(h[:, :-1], seq[:, 1:])
    d = model.logits(hm).argmax(-1)  # d[:, i] drafts seq[:, i + 2]
    lo = prompt_len - 1
    hit = (d[:, lo: seq.shape[1] - 2] == seq[:, lo + 2:]).float()
    return {"prompts": int(n), "positions": int(hit.numel()), "accept": hit.mean().item()}


@torch.no_grad()
def sample(model: DeepseekV3, ids: list[int], n_new: int, temperature: float, seed: int, device,
           eos: int = 1) -> list[int]:
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], device=device)
    out: list[int] = []
    for _ in range(n_new):
        logits = model.logits(model.forward_main(x)[:, -1]).float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        tok = int(nxt.item())
        if tok == eos:
            break
        out.append(tok)
        x = torch.cat([x, nxt], 1)
    return out


SAMPLE_PROMPTS = [
    ("text", "ROMEO.\n"),
    ("text", "Genesis 1\n\n1 In the beginning"),
    ("text", "KING.\nWhat news, my lord?\n\n"),
    ("chat", "What is love?"),
]


def samples(model: DeepseekV3, tokenizer_path: Path, device, n_new: int = 80, temperature: float = 0.8,
            seed: int = 7) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    res = []
    for k, (kind, prompt) in enumerate(SAMPLE_PROMPTS):
        if kind == "chat":
            ids = [0] + tok.encode(f"<｜User｜>{prompt}<｜Assistant｜>", add_special_tokens=False).ids
        else:
            ids = tok.encode(prompt).ids  # BOS added by the post-processor
        out = sample(model, ids, n_new, temperature, seed + k, device)
        res.append({"kind": kind, "prompt": prompt, "seed": seed + k, "temperature": temperature,
                    "completion": tok.decode(out, skip_special_tokens=False)})
    return res


def full_report(model: DeepseekV3, sets: dict[str, np.ndarray], seq: int, batch: int, device, seed: int,
                n_prefix: int = 1024, n_greedy: int = 64) -> dict:
    allt = np.concatenate(list(sets.values()))
    return {
        "heldout": perplexity_all(model, sets, seq, batch, device),
        "accept_prefixes": accept_on_prefixes(model, allt, n_prefix, 16, 256, seed, 64, device),
        "accept_greedy": accept_on_greedy(model, allt, n_greedy, 64, 128, seed + 1, device),
    }


def main() -> None:
    import checkpoint

    ap = argparse.ArgumentParser(description="evaluate a checkpoint (FP8 is dequantized on load)")
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=HERE / "work/data")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer prefixes/prompts (CPU)")
    ap.add_argument("--tokenizer", type=Path, default=HERE.parent.parent / "models/tiny-v1/tokenizer.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = checkpoint.load_model(a.ckpt, device)
    n_prefix, n_greedy = (64, 4) if a.quick else (1024, 64)
    rep = full_report(model, heldout_sets(a.data_dir), a.seq, a.batch, device, a.seed, n_prefix, n_greedy)
    rep["samples"] = samples(model, a.tokenizer, device)
    print(json.dumps(rep, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
