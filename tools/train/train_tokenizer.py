#!/usr/bin/env python3
"""Train pdserve's byte-level BPE tokenizer and tokenize the corpus.

Special tokens, in id order: 0 ``<｜begin▁of▁sentence｜>`` (BOS), 1 ``<｜end▁of▁sentence｜>`` (EOS),
2 ``<｜User｜>``, 3 ``<｜Assistant｜>``. The pre-tokenizer and decoder are byte-level, so every UTF-8
string round-trips through encode/decode. The post-processor prepends BOS (as DeepSeek-V3's
tokenizer does when ``add_special_tokens`` is on); the chat template writes BOS itself.

Document convention (used for training and evaluation): every document is tokenized as
``BOS text EOS`` and documents are concatenated in corpus order. Training samples random windows
from that stream, so a window may span a document boundary (``... EOS BOS ...``).

Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``--model-dir`` and, under
``--data-dir``, ``train.bin`` and ``heldout_<source>.bin`` (little-endian uint16 token ids) plus
``meta.json`` (token and character counts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT]

# DeepSeek-V3-style chat template: BOS, the system prompt(s) right after it, then
# <｜User｜>content and <｜Assistant｜>content<｜end▁of▁sentence｜> turns; the generation prompt is
# <｜Assistant｜>. Written with plain for/if/set so that minijinja renders it like Jinja2.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def read_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def plain() -> "list[str]":
        for t in texts:
            for s in (USER, ASSISTANT):
                t = t.replace(s, "\n")
            yield t

    tok.train_from_iterator(plain(), trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise SystemExit(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def encode_docs(tok: Tokenizer, docs: list[dict]) -> np.ndarray:
    enc = tok.encode_batch([d["text"] for d in docs], add_special_tokens=False)
    parts = []
    for e in enc:
        parts.append(np.asarray([0] + e.ids + [1], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=HERE / "work/corpus")
    ap.add_argument("--data-dir", type=Path, default=HERE / "work/data")
    ap.add_argument("--model-dir", type=Path, default=REPO / "models/tiny-v1")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=4096)
    a = ap.parse_args()

    train_docs = read_docs(a.corpus / "train.jsonl")
    held_docs = read_docs(a.corpus / "heldout.jsonl")
    tok = train([d["text"] for d in train_docs], a.vocab_size)
    if tok.get_vocab_size() != a.vocab_size:
        raise SystemExit(f"vocab size {tok.get_vocab_size()} != {a.vocab_size}")

    a.model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(a.model_dir / "tokenizer.json"))
    (a.model_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(a.max_len), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )

    a.data_dir.mkdir(parents=True, exist_ok=True)
    meta: dict = {"vocab_size": a.vocab_size, "files": {}}
    train_ids = encode_docs(tok, train_docs)
    train_ids.tofile(a.data_dir / "train.bin")
    meta["files"]["train.bin"] = {"tokens": int(train_ids.size),
                                  "chars": sum(len(d["text"]) for d in train_docs)}
    for src in sorted({d["source"] for d in held_docs}):
        docs = [d for d in held_docs if d["source"] == src]
        ids = encode_docs(tok, docs)
        ids.tofile(a.data_dir / f"heldout_{src}.bin")
        meta["files"][f"heldout_{src}.bin"] = {"tokens": int(ids.size),
                                              "chars": sum(len(d["text"]) for d in docs)}
    plain = [d for d in train_docs if d["source"] != "dialogue"]
    n_tok = sum(len(e.ids) for e in tok.encode_batch([d["text"] for d in plain], add_special_tokens=False))
    meta["train_chars_per_token"] = round(sum(len(d["text"]) for d in plain) / n_tok, 3)
    (a.data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
