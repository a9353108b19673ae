#!/usr/bin/env bash
# Per-user tokens/s with MTP off and on, through `pdserve up` and `loadtest`, at small batch.
#
# For each mode (MTP off, then on) it starts `pdserve up --mtp false|true` on the default
# checkpoint (models/tiny-v1), and for each concurrency C runs a closed loop of C users
# (`loadtest --max-concurrency C --num-prompts PROMPTS_PER_USER*C`), greedy (temperature 0),
# RANDOM_INPUT-token prompts, OUTPUT_LEN tokens each (--ignore-eos). loadtest converts its wall
# figures to simulated time with the time_scale pdserve reports; per-user tokens/s = 1000 / mean
# TPOT (simulated ms). Around every run it reads the decode instance's /metrics: steps, late steps
# (host compute slower than the paced release: these inflate wall and so converted figures; raise
# TIME_SCALE until there are none), simulated step seconds, MTP drafts and accepted drafts.
#
# Usage (from the repository root, release binaries built):
#   cargo build --release -p pdserve-cli -p loadtest
#   tools/bench/mtp.sh                      # results in $OUT (default /tmp/pdserve-bench-mtp)
# Environment: PDSERVE, LOADTEST (binaries), PORT, TIME_SCALE (default 20), CONCURRENCY ("1 2 4"),
# PROMPTS_PER_USER (2), RANDOM_INPUT (64), OUTPUT_LEN (128), TEMPERATURE (0), THREADS (all cores),
# OUT.
set -euo pipefail

PDSERVE=${PDSERVE:-target/release/pdserve}
LOADTEST=${LOADTEST:-target/release/loadtest}
PORT=${PORT:-18500}
TIME_SCALE=${TIME_SCALE:-20}
CONCURRENCY=${CONCURRENCY:-"1 2 4"}
PROMPTS_PER_USER=${PROMPTS_PER_USER:-2}
RANDOM_INPUT=${RANDOM_INPUT:-64}
OUTPUT_LEN=${OUTPUT_LEN:-128}
TEMPERATURE=${TEMPERATURE:-0}
OUT=${OUT:-/tmp/pdserve-bench-mtp}
THREAD_ARGS=()
if [[ -n "${THREADS:-}" ]]; then THREAD_ARGS=(--threads "$THREADS"); fi

for bin in "$PDSERVE" "$LOADTEST"; do
  [[ -x "$bin" ]] || { echo "mtp.sh: $bin is not built (cargo build --release -p pdserve-cli -p loadtest)" >&2; exit 1; }
done
mkdir -p "$OUT"

SERVER=""
stop_server() {
  if [[ -n "$SERVER" ]]; then
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
  fi
}
trap stop_server EXIT

# Counters of the decode instance as one JSON object.
decode_metrics() {
  curl -sf "$1/metrics" | python3 -c '
import json, sys
want = {
    "pdserve_decode_steps_total": "steps",
    "pdserve_decode_late_steps_total": "late_steps",
    "pdserve_decode_generation_tokens_total": "tokens",
    "pdserve_decode_spec_decode_num_drafts_total": "drafts",
    "pdserve_decode_spec_decode_num_accepted_tokens_total": "accepted",
    "pdserve_decode_step_simulated_seconds_sum": "sim_s",
    "pdserve_decode_step_wall_seconds_sum": "wall_s",
}
out = {v: 0.0 for v in want.values()}
for line in sys.stdin:
    parts = line.split()
    name = parts[0].split("{")[0] if parts else ""
    if len(parts) == 2 and name in want:
        out[want[name]] += float(parts[1])
print(json.dumps(out))'
}

for mtp in false true; do
  log="$OUT/up-mtp-$mtp.log"
  RUST_LOG=warn "$PDSERVE" up --port "$PORT" --mtp "$mtp" --time-scale "$TIME_SCALE" "${THREAD_ARGS[@]}" >"$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 180); do
    curl -sf "localhost:$PORT/v1/models" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 1
  done
  decode_url=$(sed -n 's/^  decode .* at \(http:\/\/[0-9.:]*\),.*/\1/p' "$log")
  [[ -n "$decode_url" ]] || { echo "mtp.sh: no decode address in $log" >&2; exit 1; }
  for c in $CONCURRENCY; do
    name="mtp-$mtp-c$c"
    decode_metrics "$decode_url" >"$OUT/$name.before.json"
    "$LOADTEST" --port "$PORT" --endpoint /v1/completions --max-concurrency "$c" \
      --num-prompts $((PROMPTS_PER_USER * c)) --random-input-len "$RANDOM_INPUT" \
      --random-output-len "$OUTPUT_LEN" --ignore-eos --temperature "$TEMPERATURE" --logprobs 0 \
      --seed 7 --disable-tqdm --save-result --result-dir "$OUT" --result-filename "$name.json" \
      >"$OUT/$name.txt"
    decode_metrics "$decode_url" >"$OUT/$name.after.json"
  done
  stop_server
done

python3 - "$OUT" "$CONCURRENCY" <<'EOF'
import json, sys
out, levels = sys.argv[1], sys.argv[2].split()
def load(name):
    with open(f"{out}/{name}") as f:
        return json.load(f)
rows = []
print(f"{'users':>5} {'MTP':>4} {'TPOT sim ms':>12} {'tok/s/user':>11} {'step sim ms':>12} "
      f"{'tok/step':>9} {'accept':>7} {'late':>9}")
# tok/step: decode tokens per decode step over all users (the batch's tokens, not per user).
for c in levels:
    tps = {}
    for mtp in ("false", "true"):
        name = f"mtp-{mtp}-c{c}"
        r = load(f"{name}.json")
        b, a = load(f"{name}.before.json"), load(f"{name}.after.json")
        d = {k: a[k] - b[k] for k in a}
        tpot = r["simulated"]["mean_tpot_ms"]
        tps[mtp] = 1000.0 / tpot
        step_ms = 1000.0 * d["sim_s"] / max(d["steps"], 1)
        step_tokens = d["tokens"] / max(d["steps"], 1)
        accept = d["accepted"] / d["drafts"] if d["drafts"] else 0.0
        rows.append({"users": int(c), "mtp": mtp == "true", "mean_tpot_sim_ms": tpot,
                     "tokens_per_s_per_user": tps[mtp], "step_sim_ms": step_ms,
                     "decode": d, "acceptance": accept})
        print(f"{c:>5} {'on' if mtp == 'true' else 'off':>4} {tpot:>12.3f} {tps[mtp]:>11.1f} "
              f"{step_ms:>12.3f} {step_tokens:>9.3f} {100 * accept:>6.1f}% "
              f"{int(d['late_steps']):>4}/{int(d['steps']):<4}")
    print(f"      per-user speedup with MTP at {c} user(s): {tps['true'] / tps['false']:.2f}x")
with open(f"{out}/summary.json", "w") as f:
    json.dump(rows, f, indent=1)
print(f"wrote {out}/summary.json")
EOF
