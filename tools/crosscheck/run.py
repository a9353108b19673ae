#!/usr/bin/env python3
"""Cross-check `loadtest` against guidellm and aiperf on one `pdserve up` (docs/loadtest.md).

Starts `pdserve up --time-scale S` on a free port, then, for each repeat and concurrency, runs
loadtest, guidellm and aiperf back to back with the same workload: `/v1/completions`,
streaming, a closed loop of fixed concurrency, --num-prompts requests, prompts of --input-len
and outputs of --output-len tokens, each ± --range-ratio (vLLM's window; defaults 256 and
96 ± 1/3, i.e. outputs of 64-128 tokens), synthesized with the pdserve tokenizer in
--tokenizer-dir, and ignore_eos so every output has exactly its max_tokens. It prints a markdown
table of each run's median TTFT, median TPOT (guidellm and aiperf call it ITL) and request/s,
their differences from loadtest's run of the same repeat and concurrency, and, as a reference
independent of run-to-run server noise, each tool's mean TTFT and token-weighted TPOT against
pdserve's own router histograms over the same run, plus the late (unpaced) prefill and decode
steps during the run.

Not run by CI. Needs, besides a release build of pdserve and loadtest
(`cargo build --release -p pdserve-cli -p loadtest`), a virtualenv holding the reference tools:

    python3 -m venv /work/venv-xcheck
    /work/venv-xcheck/bin/pip install guidellm==0.8.1 aiperf==0.13.0

Usage (from the repository root; any python3 can run this file, the tools come from --venv):

    python3 tools/crosscheck/run.py --venv /work/venv-xcheck \
        --bin-dir target/release --time-scale 8 --concurrency 4,1 --num-prompts 40 \
        --repeats 2 --out /tmp/crosscheck

Writes under --out: pdserve.log, one folder per run with the tool's own result files and log,
results.json (every figure) and table.md. `--table-only OUT/results.json` prints the table again.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def start_pdserve(args, out: Path) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    log = open(out / "pdserve.log", "w")
    cmd = [
        str(args.bin_dir / "pdserve"), "up", "--port", str(port),
        "--time-scale", str(args.time_scale),
    ]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            http_get(base + "/v1/models")
            return proc, base
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"pdserve up exited ({proc.returncode}); see {out / 'pdserve.log'}")
            time.sleep(0.5)
    proc.terminate()
    sys.exit("pdserve up did not answer /v1/models within 300 s")


LAG_SERIES = {
    "prefill_steps": "pdserve_prefill_steps_total",
    "prefill_late": "pdserve_prefill_late_steps_total",
    "prefill_lag_s": "pdserve_prefill_simulation_lag_seconds_sum",
    "decode_steps": "pdserve_decode_steps_total",
    "decode_late": "pdserve_decode_late_steps_total",
    "decode_lag_s": "pdserve_decode_simulation_lag_seconds_sum",
    # the server's own view of the same requests (router, wall clock)
    "srv_ttft_sum_s": "pdserve_router_time_to_first_token_seconds_sum",
    "srv_ttft_count": "pdserve_router_time_to_first_token_seconds_count",
    "srv_decode_sum_s": "pdserve_router_request_decode_time_seconds_sum",
    "srv_decode_count": "pdserve_router_request_decode_time_seconds_count",
}


def scrape(base: str) -> dict[str, float]:
    text = http_get(base + "/metrics")
    got = {}
    for key, name in LAG_SERIES.items():
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        got[key] = float(m.group(1)) if m else float("nan")
    return got


def client_means(ttft_ms, tpot_ms, out_tok):
    """Mean TTFT and token-weighted TPOT (Σ(E2E-TTFT)/Σ(out-1)) from per-request values."""
    rows = [(a, b, n) for a, b, n in zip(ttft_ms, tpot_ms, out_tok)
            if a is not None and b is not None and n and n > 1]
    return {
        "mean_ttft_ms": statistics.fmean(r[0] for r in rows) if rows else float("nan"),
        "tokw_tpot_ms": (sum(r[1] * (r[2] - 1) for r in rows) / sum(r[2] - 1 for r in rows))
        if rows else float("nan"),
        "decode_tokens": sum(r[2] - 1 for r in rows),
    }


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- the three tools


def loadtest_cmd(a, base, model, c, n, seed, d: Path):
    return [
        str(a.bin_dir / "loadtest"), "--base-url", base, "--model", model,
        "--endpoint", "/v1/completions", "--dataset-name", "random",
        "--num-prompts", str(n), "--max-concurrency", str(c),
        "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
        "--random-range-ratio", a.range_ratio,
        "--tokenizer", str(a.tokenizer_dir / "tokenizer.json"),
        "--seed", str(seed), "--save-result", "--result-dir", str(d),
        "--result-filename", "loadtest.json", "--disable-tqdm",
    ]


def loadtest_parse(d: Path):
    s = json.loads((d / "loadtest.json").read_text())
    recs = [json.loads(l) for l in (d / "loadtest.requests.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r["success"]]
    return {
        "completed": s["completed"], "failed": s["failed"],
        "ttft_ms": s["median_ttft_ms"], "tpot_ms": s["median_tpot_ms"],
        "req_per_s": s["request_throughput"],
        "in_tok_med": median([r["prompt_tokens"] for r in ok]),
        "out_tok_med": median([r["output_tokens"] for r in ok]),
        "out_matches_max_tokens": all(r["output_tokens"] == r["expected_output_tokens"] for r in ok),
        # the same per-request values, recomputed here, as for the other tools
        "ttft_ms_recomputed": median([r["ttft_ms"] for r in ok]),
        "tpot_ms_recomputed": median([r["tpot_ms"] for r in ok]),
        **client_means([r["ttft_ms"] for r in ok], [r["tpot_ms"] for r in ok],
                       [r["output_tokens"] for r in ok]),
    }


def _lo_hi(a):
    r = float(a.range_ratio)
    inl = (int(a.input_len * (1 - r)), -int(-a.input_len * (1 + r) // 1))
    outl = (int(a.output_len * (1 - r)), -int(-a.output_len * (1 + r) // 1))
    return inl, outl


def guidellm_cmd(a, base, model, c, n, seed, d: Path):
    (ilo, ihi), (olo, ohi) = _lo_hi(a)
    # guidellm has no uniform window: a clipped distribution with the uniform's std
    def spread(name, lo, hi):
        std = round((hi - lo) / 12**0.5)
        return f",{name}_stdev={std},{name}_min={lo},{name}_max={hi}" if std > 0 else ""

    data = (
        f"kind=synthetic_text,prompt_tokens={a.input_len}{spread('prompt_tokens', ilo, ihi)},"
        f"output_tokens={a.output_len}{spread('output_tokens', olo, ohi)}"
    )
    return [
        str(a.venv / "bin" / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={base},model={model},request_format=/v1/completions",
        "--profile", f"kind=concurrent,streams={c}",
        "--constraint", f"kind=max_requests,count={n}",
        "--data", data,
        "--tokenizer", f"kind=huggingface_auto,model={a.tokenizer_dir}",
        "--seed", f"kind=static,value={seed}",
        "--output", f"kind=json,path={d / 'guidellm.json'}",
        "--disable-progress",
    ]


def guidellm_parse(d: Path):
    b = json.loads((d / "guidellm.json").read_text())["benchmarks"][0]
    m = b["metrics"]
    ok = b["requests"]["successful"]
    return {
        "completed": len(ok),
        "failed": len(b["requests"]["errored"]) + len(b["requests"]["incomplete"]),
        "ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
        # guidellm's "ITL" is (last token - first token) / (output tokens - 1), i.e. vLLM's
        # TPOT; its median is weighted by output tokens - 1. Its "TPOT" includes the TTFT.
        "tpot_ms": m["inter_token_latency_ms"]["successful"]["median"],
        "guidellm_tpot_incl_ttft_ms": m["time_per_output_token_ms"]["successful"]["median"],
        "req_per_s": m["requests_per_second"]["successful"]["mean"],
        "req_per_s_count_over_duration": len(ok) / b["duration"],
        "in_tok_med": median([r["prompt_tokens"] for r in ok]),
        "out_tok_med": median([r["output_tokens"] for r in ok]),
        "ttft_ms_recomputed": median([r["time_to_first_token_ms"] for r in ok]),
        "tpot_ms_recomputed": median([r["inter_token_latency_ms"] for r in ok]),
        **client_means([r["time_to_first_token_ms"] for r in ok],
                       [r["inter_token_latency_ms"] for r in ok], [r["output_tokens"] for r in ok]),
    }


def aiperf_cmd(a, base, model, c, n, seed, d: Path):
    return [
        str(a.venv / "bin" / "aiperf"), "profile", "--model", model, "--url", base,
        "--endpoint-type", "completions", "--streaming",
        "--tokenizer", str(a.tokenizer_dir),
        "--isl", str(a.input_len), "--osl", str(a.output_len),
        # a ratio of 0 means fixed lengths: aiperf's default (stddev 0)
        *(["--random-range-ratio", a.range_ratio] if float(a.range_ratio) > 0 else []),
        "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
        "--concurrency", str(c), "--request-count", str(n), "--random-seed", str(seed),
        "--output-artifact-dir", str(d / "aiperf"),
        "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
    ]


def aiperf_parse(d: Path):
    s = json.loads((d / "aiperf" / "profile_export_aiperf.json").read_text())
    recs = [json.loads(l)["metrics"] for l in
            (d / "aiperf" / "profile_export.jsonl").read_text().splitlines() if l.strip()]
    val = lambda r, k: (r.get(k) or {}).get("value")  # noqa: E731
    return {
        "completed": int(s["request_count"]["avg"]),
        "failed": int((s.get("error_request_count") or {}).get("avg", 0)),
        "ttft_ms": s["time_to_first_token"]["p50"],
        # aiperf's "ITL" is (request latency - TTFT) / (OSL - 1), with the request latency
        # ending at the last content chunk: vLLM's TPOT.
        "tpot_ms": s["inter_token_latency"]["p50"],
        "req_per_s": s["request_throughput"]["avg"],
        "in_tok_med": median([val(r, "input_sequence_length") for r in recs]),
        "out_tok_med": median([val(r, "output_sequence_length") for r in recs]),
        "ttft_ms_recomputed": median([val(r, "time_to_first_token") for r in recs]),
        "tpot_ms_recomputed": median([val(r, "inter_token_latency") for r in recs]),
        **client_means([val(r, "time_to_first_token") for r in recs],
                       [val(r, "inter_token_latency") for r in recs],
                       [val(r, "output_sequence_length") for r in recs]),
    }


TOOLS = {
    "loadtest": (loadtest_cmd, loadtest_parse),
    "guidellm": (guidellm_cmd, guidellm_parse),
    "aiperf": (aiperf_cmd, aiperf_parse),
}


def tool_version(a, tool):
    if tool == "loadtest":
        return "workspace " + subprocess.run(
            [str(a.bin_dir / "loadtest"), "--version"], capture_output=True, text=True
        ).stdout.split()[-1]
    out = subprocess.run(
        [str(a.venv / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version('{tool}'))"],
        capture_output=True, text=True,
    )
    return out.stdout.strip()


def pct(x, ref):
    return 100.0 * (x - ref) / ref if ref else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--venv", type=Path, default=Path("/work/venv-xcheck"))
    p.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "models" / "tiny-v1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=8.0)
    p.add_argument("--concurrency", default="4,1")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--range-ratio", default=repr(1 / 3))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tools", default="loadtest,guidellm,aiperf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/crosscheck"))
    p.add_argument("--table-only", type=Path, metavar="RESULTS_JSON",
                   help="print the table of an earlier run's results.json and exit")
    a = p.parse_args()
    if a.table_only:
        print(render_table(json.loads(a.table_only.read_text())))
        return
    a.bin_dir, a.tokenizer_dir = a.bin_dir.resolve(), a.tokenizer_dir.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    tools = a.tools.split(",")

    proc, base = start_pdserve(a, a.out)
    # SIGTERM (and SIGINT, which a background job ignores) stop the run; `finally` stops pdserve
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit("interrupted"))
    results = {"time_scale": a.time_scale, "versions": {t: tool_version(a, t) for t in tools},
               "runs": []}
    try:
        model = json.loads(http_get(base + "/v1/models"))["data"][0]["id"]
        # warm the server (first requests pay one-time costs)
        subprocess.run(loadtest_cmd(a, base, model, 2, 4, 999, a.out / "warmup"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        for rep in range(1, a.repeats + 1):
            for c in [int(x) for x in a.concurrency.split(",")]:
                for tool in tools:
                    d = a.out / f"c{c}-r{rep}-{tool}"
                    d.mkdir(parents=True, exist_ok=True)
                    mk, parse = TOOLS[tool]
                    cmd = mk(a, base, model, c, a.num_prompts, a.seed + rep, d)
                    print(f"[c={c} rep={rep}] $ {shlex.join(cmd)}", flush=True)
                    before = scrape(base)
                    t0 = time.time()
                    with open(d / "tool.log", "w") as log:
                        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=d).returncode
                    wall = time.time() - t0
                    after = scrape(base)
                    lag = {k: after[k] - before[k] for k in LAG_SERIES}
                    row = {"tool": tool, "concurrency": c, "repeat": rep, "rc": rc,
                           "command": shlex.join(cmd), "tool_wall_s": wall, "lag": lag}
                    if rc == 0:
                        row.update(parse(d))
                        # server-side means over the same window: TTFT from request arrival
                        # at the router, TPOT = Σ decode time / Σ (out - 1) client-counted
                        row["srv_mean_ttft_ms"] = 1e3 * lag["srv_ttft_sum_s"] / max(1, lag["srv_ttft_count"])
                        row["srv_tokw_tpot_ms"] = 1e3 * lag["srv_decode_sum_s"] / max(1, row["decode_tokens"])
                    results["runs"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
                    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    table = render_table(results)
    (a.out / "table.md").write_text(table)
    print(table)


def render_table(results) -> str:
    """Markdown table of every run; Δ columns are relative to loadtest's run of the same
    concurrency and repeat; the client-vs-server columns compare each tool's mean TTFT and
    token-weighted TPOT with pdserve's router histograms over the same run."""
    lines = [
        f"time_scale {results['time_scale']}; versions: "
        + ", ".join(f"{t} {v}" for t, v in results["versions"].items()),
        "",
        "| c | rep | tool | median TTFT ms | median TPOT ms | req/s | ΔTTFT % | ΔTPOT % "
        "| Δreq/s % | in/out tok (median) | mean TTFT client − server ms | "
        "TPOT client / server − 1 % | late steps prefill, decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r["rc"] != 0:
            lines.append(f"| {r['concurrency']} | {r['repeat']} | {r['tool']} | failed rc={r['rc']} |")
            continue
        ref = next((x for x in results["runs"] if x["tool"] == "loadtest" and x["rc"] == 0
                    and x["concurrency"] == r["concurrency"] and x["repeat"] == r["repeat"]), r)
        lag = r["lag"]
        lines.append(
            f"| {r['concurrency']} | {r['repeat']} | {r['tool']} | {r['ttft_ms']:.1f} | "
            f"{r['tpot_ms']:.2f} | {r['req_per_s']:.3f} | {pct(r['ttft_ms'], ref['ttft_ms']):+.1f} | "
            f"{pct(r['tpot_ms'], ref['tpot_ms']):+.1f} | {pct(r['req_per_s'], ref['req_per_s']):+.1f} | "
            f"{r['in_tok_med']:.0f}/{r['out_tok_med']:.0f} | "
            f"{r['mean_ttft_ms'] - r['srv_mean_ttft_ms']:+.1f} | "
            f"{pct(r['tokw_tpot_ms'], r['srv_tokw_tpot_ms']):+.2f} | "
            f"{lag['prefill_late']:.0f}/{lag['prefill_steps']:.0f}, "
            f"{lag['decode_late']:.0f}/{lag['decode_steps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
