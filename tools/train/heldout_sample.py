#!/usr/bin/env python3
"""Write the committed held-out sample ``tools/train/heldout/sample.jsonl``.

The sample is every third document (index % 3 == 0, per source, in corpus order) of the held-out
split that ``build_corpus.py`` writes to ``tools/train/work/corpus/heldout.jsonl``: 16 King James
Bible chapters and 14 Shakespeare play/poem tails, about 123,000 characters. No document of it was
trained on. The format is the corpus builder's: one ``{"source", "name", "text"}`` object per line.

``pdserve eval --text tools/train/heldout/sample.jsonl`` reads it (each document encoded as
``BOS text EOS``, as ``train_tokenizer.py`` does). Rebuild with::

    python3 tools/train/build_corpus.py && python3 tools/train/heldout_sample.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVERY = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=Path, default=HERE / "work/corpus/heldout.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "heldout/sample.jsonl")
    a = ap.parse_args()
    docs = [json.loads(line) for line in a.heldout.read_text("utf-8").splitlines() if line]
    seen: dict[str, int] = {}
    kept = []
    for d in docs:
        k = seen.get(d["source"], 0)
        seen[d["source"]] = k + 1
        if k % EVERY == 0:
            kept.append({"source": d["source"], "name": d["name"], "text": d["text"]})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        for d in kept:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    chars: dict[str, int] = {}
    for d in kept:
        chars[d["source"]] = chars.get(d["source"], 0) + len(d["text"])
    print(json.dumps({"out": str(a.out), "docs": len(kept), "chars": chars, "bytes": a.out.stat().st_size}))


if __name__ == "__main__":
    main()
