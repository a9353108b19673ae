"""Block-wise FP8 quantization matches DeepSeek-V3's storage convention."""

import pytest
import torch

import fp8


@pytest.mark.parametrize("shape", [(256, 256), (32, 256), (256, 32), (300, 130), (1, 1)])
def test_scale_inv_has_one_entry_per_128x128_block(shape):
    q, s = fp8.quantize(torch.randn(shape))
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == shape
    assert s.dtype == torch.float32
    assert tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))


def test_dequantized_weight_is_within_e4m3_rounding_of_the_original():
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.logspace(-3, 0, 260)  # columns of very different scale
    q, s = fp8.quantize(w)
    back = fp8.dequantize(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 in the normal range (|w| / scale >= 2^-6);
    # below it the absolute error is at most half a subnormal step, scale * 2^-10
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    err = (back - w).abs()
    normal = w.abs() >= scale * 2.0**-6
    assert (err[normal] <= w.abs()[normal] * 2.0**-4 * (1 + 1e-6)).all()
    assert (err[~normal] <= scale[~normal] * 2.0**-10 * (1 + 1e-6)).all()


def test_block_amax_maps_to_e4m3_max():
    w = torch.zeros(128, 128)
    w[5, 7] = -3.0
    q, s = fp8.quantize(w)
    assert s.item() == pytest.approx(3.0 / 448)
    assert q.float()[5, 7].item() == -448.0
    assert fp8.dequantize(q, s)[5, 7].item() == pytest.approx(-3.0)


def test_all_zero_block_gets_unit_scale_and_round_trips_to_zero():
    q, s = fp8.quantize(torch.zeros(130, 4))
    assert torch.equal(s, torch.ones(2, 1))
    assert torch.count_nonzero(fp8.dequantize(q, s)) == 0


def test_dequantize_rejects_a_scale_of_the_wrong_shape():
    q, _ = fp8.quantize(torch.randn(256, 256))
    with pytest.raises(ValueError, match="scale_inv shape"):
        fp8.dequantize(q, torch.ones(1, 2))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.q_a_proj.weight", True),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
        ("model.layers.0.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.gate_proj.weight", True),
        ("model.layers.3.mlp.experts.255.down_proj.weight", True),
        ("model.layers.3.mlp.shared_experts.up_proj.weight", True),
        ("model.layers.3.mlp.gate.weight", False),
        ("model.layers.3.mlp.gate.e_score_correction_bias", False),
        ("model.layers.0.self_attn.q_a_layernorm.weight", False),
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.layers.5.eh_proj.weight", False),
        ("model.layers.5.shared_head.head.weight", False),
        ("model.layers.5.embed_tokens.weight", False),
    ],
)
def test_fp8_selection_follows_the_release(name, expected):
    assert fp8.is_fp8_weight(name) is expected
