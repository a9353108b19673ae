#!/usr/bin/env bash
# Train, export (FP8) and evaluate pdserve's tiny-v1 checkpoint on one CUDA GPU.
#
# Needs tools/train/work/data (made on any machine by build_corpus.py + train_tokenizer.py) and
# models/tiny-v1/tokenizer.json. Writes into $OUT (default tools/train/work/run):
#   ckpt/  config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json
#   train_log.jsonl  results.json  run.log
# Extra arguments go to train.py (e.g. --steps 1200 --distill-steps 1500).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-tools/train/work/run}
mkdir -p "$OUT/ckpt"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  start=$(date +%s)
  python3 tools/train/train.py --device cuda --out "$OUT" --model-dir "$OUT/ckpt" --deadline-s 540 "$@"
  echo "run_device: total wall $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/run.log"
