#!/usr/bin/env python3
"""Build pdserve's golden checkpoints and their reference logits with Hugging Face transformers.

For each golden in specs.CONFIGS this script

1. draws weights deterministically under DeepSeek's released tensor names (weights.py), stored as
   bfloat16 (``e_score_correction_bias`` float32) in ``model.safetensors`` with per-expert names;
2. writes ``config.json`` (DeepSeek's keys) and loads the checkpoint with transformers'
   ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM`` (``from_pretrained``, float32, eager
   attention), checking that it equals a model filled directly from the drawn tensors;
3. runs fixed token sequences (explicit ``position_ids``) and records logits at every position,
   the MTP logits (transformers' ``MtpModel``, adapted to load layer ``num_hidden_layers``), and the
   routing of every MoE layer (selected expert ids and weights per token);
4. checks that logits vary by several units, that the correction bias changes at least one
   expert selection, and that every routing decision has a margin of at least MIN_ROUTING_MARGIN
   (otherwise the router is redrawn), so that an f32 reimplementation selects the same experts.

Usage::

    python tools/goldens/make_goldens.py [--out crates/model/tests/goldens] [--only tiny,yarn]

Output layout and the reference.json schema: crates/model/tests/goldens/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import specs  # noqa: E402
import weights  # noqa: E402

MIN_ROUTING_MARGIN = 2e-4
MAX_TRIALS = 400
LOGIT_STD_RANGE = (2.0, 10.0)
TOLERANCE_MAX_ABS = 1e-4
# Plain reference paths: eager attention and the per-expert loop (not grouped_mm).
IMPL = {"attn_implementation": "eager", "experts_implementation": "eager"}


def model_class(cfg: dict):
    return DeepseekV3ForCausalLM if cfg["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM


def load_config(golden_dir: Path):
    return AutoConfig.from_pretrained(golden_dir, attn_implementation="eager", experts_implementation="eager")


def write_checkpoint(golden_dir: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    golden_dir.mkdir(parents=True, exist_ok=True)
    (golden_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    path = golden_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def write_sharded(src_dir: Path, dst_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two-shard copy of a golden: model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "reference.json"):
        shutil.copyfile(src_dir / name, dst_dir / name)
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    acc = 0
    for n in names:
        shards[0 if acc < total // 2 else 1][n] = tensors[n].contiguous()
        acc += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(dst_dir / fname), metadata={"format": "pt"})
        (dst_dir / fname).chmod(0o644)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_sequences(name: str, cfg: dict, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng([seed, 7])
    out = []
    for length, start in specs.SEQUENCES[name]:
        toks = rng.integers(4, cfg["vocab_size"], size=length).tolist()
        if start == 0:
            toks[0] = cfg["bos_token_id"]
        out.append((toks, list(range(start, start + length))))
    return out


class GateRecorder:
    """Forward hooks on every router: records (layer index, router logits, top-k ids, weights)."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = []

    def attach(self, module: torch.nn.Module, layer: int) -> None:
        def hook(_m, _inp, out, layer=layer):
            logits, w, idx = out
            self.calls.append((layer, logits.detach().clone(), idx.detach().clone(), w.detach().clone()))

        self.handles.append(module.register_forward_hook(hook))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def select(cfg: dict, router_logits: torch.Tensor, bias: torch.Tensor | None):
    """DeepSeek's selection, recomputed from the recorded router logits.

    Returns (selected ids as sorted lists, per-token smallest margin of any decision: group cut
    and expert cut)."""
    k = cfg["num_experts_per_tok"]
    n_exp = cfg["n_routed_experts"]
    if cfg["scoring_func"] == "sigmoid":
        scores = router_logits.sigmoid()
    else:
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    choice = scores + bias if bias is not None else scores.clone()
    margins = torch.full((scores.shape[0],), float("inf"))
    groups, topk_group = cfg["n_group"], cfg["topk_group"]
    if groups > 1:
        per = n_exp // groups
        gscore = choice.view(-1, groups, per).topk(2, dim=-1)[0].sum(dim=-1)
        gs = gscore.sort(dim=-1, descending=True).values
        if topk_group < groups:
            margins = torch.minimum(margins, gs[:, topk_group - 1] - gs[:, topk_group])
        gidx = gscore.topk(topk_group, dim=-1)[1]
        gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1.0).bool()
        emask = gmask.unsqueeze(-1).expand(-1, groups, per).reshape(-1, n_exp)
        choice = choice.masked_fill(~emask, float("-inf"))
    srt = choice.sort(dim=-1, descending=True).values
    margins = torch.minimum(margins, srt[:, k - 1] - srt[:, k])
    ids = choice.topk(k, dim=-1)[1].sort(dim=-1).values
    return ids.tolist(), margins


def run_golden(name: str, out_root: Path) -> dict:
    cfg = specs.CONFIGS[name]
    seed = specs.SEEDS[name]
    golden_dir = out_root / name
    seqs = make_sequences(name, cfg, seed)
    cls = model_class(cfg)
    n_layers = cfg["num_hidden_layers"]
    n_mtp = cfg.get("num_nextn_predict_layers", 0)
    for trial in range(MAX_TRIALS):
        tensors = weights.deepseek_tensors(cfg, seed, trial)
        write_checkpoint(golden_dir, cfg, tensors)
        result = evaluate(name, cfg, cls, golden_dir, tensors, seqs, n_layers, n_mtp)
        if result["routing_margin_min"] >= MIN_ROUTING_MARGIN:
            result["router_trial"] = trial
            break
        print(f"  {name}: trial {trial}: routing margin {result['routing_margin_min']:.3g} too small, redrawing router")
    else:
        raise SystemExit(f"{name}: no router draw with routing margin >= {MIN_ROUTING_MARGIN}")
    return finish(name, cfg, golden_dir, tensors, seqs, result)


@torch.no_grad()
def evaluate(name, cfg, cls, golden_dir, tensors, seqs, n_layers, n_mtp) -> dict:
    hf_cfg = load_config(golden_dir)
    model = cls.from_pretrained(golden_dir, dtype=torch.float32, **IMPL).eval()

    # The checkpoint loaded through transformers' own converter must equal the drawn tensors.
    main_sd, mtp_sd = weights.to_transformers(cfg, tensors)
    direct = cls._from_config(hf_cfg, dtype=torch.float32, **IMPL).eval()
    for m in (model, direct):
        if (m.config._attn_implementation, m.config._experts_implementation) != ("eager", "eager"):
            raise SystemExit(f"{name}: transformers did not take eager attention / experts")
    missing, unexpected = direct.load_state_dict(main_sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise SystemExit(f"{name}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    loaded = model.state_dict()
    for k, v in main_sd.items():
        if not torch.equal(loaded[k], v):
            raise SystemExit(f"{name}: from_pretrained tensor {k} differs from the drawn one")

    mtp = None
    if n_mtp:
        mtp = MtpModel(model, n_mtp).eval()
        missing, unexpected = mtp.load_state_dict(mtp_sd, strict=False)
        allowed = ("embed_tokens", "shared_head", "rotary")
        if unexpected or [m for m in missing if not m.startswith(allowed)]:
            raise SystemExit(f"{name}: MTP state dict mismatch: missing {missing}, unexpected {unexpected}")

    rec = GateRecorder()
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            rec.attach(layer.mlp.gate, i)
    if mtp is not None:
        for k, layer in enumerate(mtp.layers):
            rec.attach(layer.mtp_block.mlp.gate, n_layers + k)
    gates = {i: l.mlp.gate for i, l in enumerate(model.model.layers) if hasattr(l.mlp, "gate")}
    if mtp is not None:
        gates.update({n_layers + k: l.mtp_block.mlp.gate for k, l in enumerate(mtp.layers)})

    out_seqs = []
    margin_min = float("inf")
    changed = 0
    decisions = 0
    all_logits = []
    for toks, pos in seqs:
        ids = torch.tensor([toks])
        pids = torch.tensor([pos])
        full = model(input_ids=ids, position_ids=pids).logits[0]
        ref = direct(input_ids=ids, position_ids=pids).logits[0]
        rec.take()
        hidden = model.model(input_ids=ids, position_ids=pids).last_hidden_state  # after the final norm
        logits = model.lm_head(hidden)[0]
        if not torch.equal(full, logits) or not torch.equal(full, ref):
            raise SystemExit(f"{name}: logits differ between forward paths / direct-filled model")
        all_logits.append(logits)
        entry = {"tokens": toks, "positions": pos, "logits": logits}
        if mtp is not None and len(toks) > 1:
            # MTP at position i: eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) -> block at position i
            # -> shared_head.norm -> shared_head.head.
            h_mtp = mtp.forward_layer(0, hidden[:, :-1], pids[:, :-1], None, input_ids=ids[:, 1:])
            entry["mtp_logits"] = mtp._project_to_logits(h_mtp)[0]
        elif mtp is not None:
            entry["mtp_logits"] = torch.zeros((0, cfg["vocab_size"]))
        calls = rec.take()
        routing = []
        for layer, rlogits, idx, w in calls:
            gate = gates[layer]
            bias = getattr(gate, "e_score_correction_bias", None)
            sel, margins = select(cfg, rlogits, bias)
            if sel != idx.sort(dim=-1).values.tolist():
                raise SystemExit(f"{name}: recomputed selection differs from transformers' at layer {layer}")
            if bias is not None:
                sel0, _ = select(cfg, rlogits, None)
                changed += sum(a != b for a, b in zip(sel, sel0))
            decisions += len(sel)
            margin_min = min(margin_min, float(margins.min()))
            order = idx.argsort(dim=-1)
            routing.append(
                {"layer": layer, "experts": sel, "weights": w.gather(1, order)}
            )
        entry["routing"] = routing
        out_seqs.append(entry)
    for h in rec.handles:
        h.remove()
    cat = torch.cat(all_logits)
    return {
        "sequences": out_seqs,
        "routing_margin_min": margin_min,
        "bias_changed_selections": changed,
        "routing_decisions": decisions,
        "logit_std": float(cat.std()),
        "logit_range": [float(cat.min()), float(cat.max())],
    }


def fmt(x: float) -> str:
    return str(np.float32(x))


def rows(t) -> str:
    if isinstance(t, torch.Tensor):
        t = t.tolist()
    return "[" + ", ".join(fmt(v) if isinstance(v, float) else str(v) for v in t) + "]"


def matrix(t, indent: str) -> str:
    if isinstance(t, torch.Tensor):
        t = t.tolist()
    if not t:
        return "[]"
    inner = (",\n" + indent + "  ").join(rows(r) for r in t)
    return "[\n" + indent + "  " + inner + "\n" + indent + "]"


def reference_json(name: str, cfg: dict, result: dict) -> str:
    has_mtp = cfg.get("num_nextn_predict_layers", 0) > 0
    head = {
        "name": name,
        "model_class": model_class(cfg).__name__,
        "generator": "tools/goldens/make_goldens.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": specs.SEEDS[name],
        "router_trial": result["router_trial"],
        "weights_dtype": "bfloat16 (mlp.gate.e_score_correction_bias: float32)",
        "compute_dtype": "float32",
        "attention": "eager",
        "experts_implementation": "eager",
        "tolerance": {"logits_max_abs": TOLERANCE_MAX_ABS, "mtp_logits_max_abs": TOLERANCE_MAX_ABS},
        "vocab_size": cfg["vocab_size"],
        "has_mtp": has_mtp,
        "logit_std": round(result["logit_std"], 4),
        "logit_range": [round(v, 4) for v in result["logit_range"]],
        "routing_margin_min": float(fmt(result["routing_margin_min"])),
        "routing_decisions": result["routing_decisions"],
        "bias_changed_selections": result["bias_changed_selections"],
    }
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    lines.append('  "sequences": [')
    seq_txt = []
    for s in result["sequences"]:
        parts = [
            f'      "tokens": {rows(s["tokens"])}',
            f'      "positions": {rows(s["positions"])}',
            f'      "logits": {matrix(s["logits"], "      ")}',
        ]
        if has_mtp:
            parts.append(f'      "mtp_logits": {matrix(s["mtp_logits"], "      ")}')
        rtxt = []
        for r in s["routing"]:
            rtxt.append(
                "        {\n"
                f'          "layer": {r["layer"]},\n'
                f'          "experts": {matrix(r["experts"], "          ")},\n'
                f'          "weights": {matrix(r["weights"], "          ")}\n'
                "        }"
            )
        parts.append('      "routing": [\n' + ",\n".join(rtxt) + "\n      ]")
        seq_txt.append("    {\n" + ",\n".join(parts) + "\n    }")
    lines.append(",\n".join(seq_txt))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def finish(name, cfg, golden_dir, tensors, seqs, result) -> dict:
    (golden_dir / "reference.json").write_text(reference_json(name, cfg, result))
    # Round trip: the written JSON parses and matches the computed logits within f32 rounding.
    ref = json.loads((golden_dir / "reference.json").read_text())
    for s, r in zip(result["sequences"], ref["sequences"]):
        diff = (torch.tensor(r["logits"], dtype=torch.float32) - s["logits"]).abs().max()
        if float(diff) != 0.0:
            raise SystemExit(f"{name}: reference.json logits do not round-trip (max diff {float(diff)})")
    lo, hi = LOGIT_STD_RANGE
    if not lo <= result["logit_std"] <= hi:
        raise SystemExit(f"{name}: logit std {result['logit_std']:.3f} outside {LOGIT_STD_RANGE}")
    if weights.uses_bias(cfg) and result["bias_changed_selections"] < 1:
        raise SystemExit(f"{name}: e_score_correction_bias changed no expert selection")
    size = (golden_dir / "model.safetensors").stat().st_size
    print(
        f"{name}: logit std {result['logit_std']:.3f} (range {result['logit_range'][0]:.2f}..{result['logit_range'][1]:.2f}), "
        f"bias changed {result['bias_changed_selections']}/{result['routing_decisions']} selections, "
        f"min routing margin {result['routing_margin_min']:.3g} (router trial {result['router_trial']}), "
        f"model.safetensors {size} bytes, reference.json {(golden_dir / 'reference.json').stat().st_size} bytes"
    )
    if name == specs.SHARDED:
        sharded_dir = golden_dir.parent / f"{name}-sharded"
        write_sharded(golden_dir, sharded_dir, tensors)
        check_sharded(name, cfg, sharded_dir, result)
    return result


@torch.no_grad()
def check_sharded(name, cfg, sharded_dir, result) -> None:
    model = model_class(cfg).from_pretrained(sharded_dir, dtype=torch.float32, **IMPL).eval()
    for s in result["sequences"]:
        logits = model(input_ids=torch.tensor([s["tokens"]]), position_ids=torch.tensor([s["positions"]])).logits[0]
        if not torch.equal(logits, s["logits"]):
            raise SystemExit(f"{name}: sharded checkpoint gives different logits")
    print(f"{name}-sharded: two shards + index load in transformers with identical logits")


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "README.md":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description="Build pdserve's golden checkpoints and reference logits.")
    ap.add_argument("--out", type=Path, default=Path("crates/model/tests/goldens"))
    ap.add_argument("--only", default="", help="comma-separated golden names (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    names = [n for n in args.only.split(",") if n] or list(specs.CONFIGS)
    for n in names:
        if n not in specs.CONFIGS:
            raise SystemExit(f"unknown golden {n!r}; known: {', '.join(specs.CONFIGS)}")
        run_golden(n, args.out)
    print(f"sha256 of all golden files under {args.out}: {digest(args.out)}")


if __name__ == "__main__":
    main()
