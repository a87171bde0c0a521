"""Where the rounding starts (`weight_init`): GPTQ's error-compensated weight against round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_samples, tiny_bert, tiny_decoder, tiny_opt
from helpers import decoder_calib as llama_calib

from hf_qlimit import QLimitConfig
from hf_qlimit.hf.surgery import quantized_modules


def _models():
    return {
        "llama": (lambda: tiny_decoder("llama"), lambda: llama_calib(16, 16)),
        "opt": (tiny_opt, lambda: calib_samples(16)),
        "bert": (tiny_bert, lambda: calib_samples(16)),
    }


def _block_codes(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.clone() for n, m in quantized_modules(model) if ".layers." in n or ".layer." in n}


def _quantize(kind: str, **kwargs):
    build, data = _models()[kind]
    model = build()
    base = {"weight_bits": 3, "act_bits": None, "num_samples": 16, "batch_size": 8}
    model.quantize_qlimit(data(), QLimitConfig(**{**base, **kwargs}))
    return model


@pytest.mark.parametrize(
    "kind,margin", [("llama", None), ("opt", None), ("bert", None), ("llama", 0.05), ("bert", 0.2)]
)
def test_zero_iterations_give_the_initialisers_codes(kind, margin):
    gptq = _block_codes(_quantize(kind, method="rtn", weight_init="gptq"))
    zero_iters = _block_codes(_quantize(kind, method="qdrop", weight_init="gptq", iters=0, init_margin=margin))
    rtn = _block_codes(_quantize(kind, method="rtn", weight_init="rtn"))
    assert gptq.keys() == zero_iters.keys() == rtn.keys() and gptq
    for name in gptq:
        assert torch.equal(gptq[name], zero_iters[name]), name
    assert any(not torch.equal(gptq[n], rtn[n]) for n in gptq)  # GPTQ did change codes


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_gptq_start_lowers_the_block_error(kind):
    rtn = _quantize(kind, method="rtn", weight_init="rtn", group_size=16).qlimit_block_errors
    gptq = _quantize(kind, method="rtn", weight_init="gptq", group_size=16).qlimit_block_errors
    for r, g in zip(rtn, gptq):
        assert g["mse"] < r["mse"], (r, g)


def _assert_reloads_exactly(model, folder) -> None:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_gptq_start_survives_save_and_reload(tmp_path):
    model = _quantize("llama", method="qdrop", weight_init="gptq", iters=10, group_size=16)
    _assert_reloads_exactly(model, tmp_path)


def test_margin_start_puts_the_soft_weight_next_to_the_decision():
    from hf_qlimit.quantizers import WeightQuantizer

    w = torch.randn(8, 16)
    q = WeightQuantizer(3, (8, 16), None, False)
    q.init_range(w, 2.4)
    h = q.begin_adaround(w.clone(), 0.05).soft_rounding()
    assert torch.allclose(torch.minimum(h, 1 - h), torch.full_like(h, 0.05), atol=1e-5)


def test_unknown_weight_init_is_an_error():
    with pytest.raises(ValueError, match="weight_init"):
        QLimitConfig(weight_init="awq")
    with pytest.raises(ValueError, match="init_margin"):
        QLimitConfig(init_margin=0.5)


def test_minmax_grid_covers_each_group_exactly():
    from hf_qlimit.quantizers import WeightQuantizer
    from hf_qlimit.quantizers.fake_quant import dequantize_codes, quantize_codes
    from hf_qlimit.quantizers.range_search import group_view

    w = torch.randn(8, 32)
    minmax, lp = WeightQuantizer(3, (8, 32), 16, False), WeightQuantizer(3, (8, 32), 16, False)
    minmax.init_range(w, None)
    lp.init_range(w, 2.4)
    g = group_view(w, 16)
    scale, zero = minmax.scale.unsqueeze(-1), minmax.zero.float().unsqueeze(-1)
    q = dequantize_codes(quantize_codes(g, scale, zero, 3), scale, zero)
    # no clipping: every weight lies within half a step of its grid point, the group's extremes included
    assert ((q - g).abs() <= scale / 2 + 1e-6).all()
    assert (lp.scale <= minmax.scale + 1e-7).all() and (lp.scale < minmax.scale - 1e-7).any()  # Lp clips some


def test_weight_range_and_act_order_reach_the_codes():
    def codes(weight_range: str, act_order: bool) -> dict[str, torch.Tensor]:
        return _block_codes(
            _quantize(
                "llama",
                method="rtn",
                weight_init="gptq",
                group_size=16,
                weight_range=weight_range,
                gptq_act_order=act_order,
            )
        )

    base, minmax, ordered = codes("lp", False), codes("minmax", False), codes("lp", True)
    assert any(not torch.equal(base[n], minmax[n]) for n in base)
    assert any(not torch.equal(base[n], ordered[n]) for n in base)
    with pytest.raises(ValueError, match="weight_range"):
        QLimitConfig(weight_range="mse")


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_signed_rounding_at_zero_iterations_gives_the_initialisers_codes(kind):
    gptq = _block_codes(_quantize(kind, method="rtn", weight_init="gptq", group_size=16))
    signed = _block_codes(_quantize(kind, method="qdrop", weight_init="gptq", iters=0, rounding="sign", group_size=16))
    assert gptq.keys() == signed.keys() and gptq
    for name in gptq:
        assert torch.equal(gptq[name], signed[name]), name


def test_signed_rounding_learns_codes_and_grid_and_reloads(tmp_path):
    start = _quantize("llama", method="rtn", weight_init="gptq", group_size=16)
    model = _quantize(
        "llama", method="brecq", weight_init="gptq", iters=30, rounding="sign", weight_lr=5e-3, group_size=16
    )
    codes, learned = _block_codes(start), _block_codes(model)
    assert any(not torch.equal(codes[n], learned[n]) for n in codes)  # some rounding flipped
    scales = {n: m.weight_quantizer.scale for n, m in quantized_modules(start)}
    assert any(not torch.equal(scales[n], m.weight_quantizer.scale) for n, m in quantized_modules(model) if n in codes)
    for before, after in zip(start.qlimit_block_errors, model.qlimit_block_errors):
        assert after["mse"] <= before["mse"] * 1.05, (before, after)  # the best iterate is kept
    _assert_reloads_exactly(model, tmp_path)


def test_signed_rounding_keeps_each_factor_and_offset_in_bounds():
    from hf_qlimit.quantizers.signround import FACTOR_BOUNDS, V_BOUND, SignRoundState, SignSGD

    w = torch.randn(4, 2, 8)
    scale = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 7
    zero = (-w.amin(-1, keepdim=True) / scale).round()
    r = SignRoundState(w, scale, zero, 3, symmetric=False, learn_range=True)
    assert torch.allclose(r(), (torch.round(w / scale) + zero).clamp(0, 7).sub(zero).mul(scale))
    opt = SignSGD(r.parameters_to_learn(), lr=0.3, total=10)
    for _ in range(10):
        opt.zero_grad()
        (r() - 3 * w).pow(2).sum().backward()
        opt.step()
        r.clamp_()
    assert r.offset.abs().max() <= V_BOUND
    assert FACTOR_BOUNDS[0] <= r.low_factor.min() and r.high_factor.max() <= FACTOR_BOUNDS[1]
