"""The shipped models/tiny-v1 checkpoint and tokenizer keep their contract."""

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "models/tiny-v1"


@pytest.fixture(scope="module")
def tok():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))


def test_special_tokens_have_the_documented_ids(tok):
    assert [tok.token_to_id(t) for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                         "<｜Assistant｜>")] == [0, 1, 2, 3]


def test_any_utf8_text_round_trips(tok):
    rng = random.Random(3)
    pool = "abc XYZ\n\t0123 éüß ΩЖ 日本語 😀🚀 \x00\x7f" + "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(200))
    pool = "".join(c for c in pool if not 0xD800 <= ord(c) <= 0xDFFF)
    for _ in range(50):
        s = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 60)))
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s


def test_encode_prepends_bos_only_with_special_tokens(tok):
    assert tok.encode("ROMEO.").ids[0] == 0
    assert tok.encode("ROMEO.", add_special_tokens=False).ids[0] != 0


def test_chat_template_renders_deepseek_v3_layout():
    jinja2 = pytest.importorskip("jinja2")
    cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
            {"role": "assistant", "content": "I."}, {"role": "user", "content": "Why?"}]
    out = jinja2.Environment().from_string(cfg["chat_template"]).render(
        messages=msgs, bos_token=cfg["bos_token"], add_generation_prompt=True)
    assert out == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Who?<｜Assistant｜>I.<｜end▁of▁sentence｜>"
                   "<｜User｜>Why?<｜Assistant｜>")


def test_checkpoint_fits_the_size_budget_and_keeps_v3_routing():
    if not (MODEL / "config.json").exists():
        pytest.skip("no trained checkpoint")
    total = sum(p.stat().st_size for p in MODEL.iterdir() if p.is_file())
    assert total <= 40_000_000
    cfg = json.loads((MODEL / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"],
            cfg["n_shared_experts"], cfg["routed_scaling_factor"], cfg["num_nextn_predict_layers"]) == (
            256, 8, 8, 4, 1, 2.5, 1)
    assert cfg["model_type"] == "deepseek_v3" and cfg["rope_interleave"] is True
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    for f in set(index["weight_map"].values()):
        assert (MODEL / f).stat().st_size <= 16 * 2**20
    n = cfg["num_hidden_layers"]
    moe_layers = list(range(cfg["first_k_dense_replace"], n + 1))
    for layer in moe_layers:
        for e in range(256):
            assert f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight_scale_inv" in names
