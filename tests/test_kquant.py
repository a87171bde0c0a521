"""GGUF k-quant grids (`weight_format="gguf:q2_k"` ... `"gguf:q6_k"`, quantizers/kquant.py) and their encoding
(export/gguf_kquants.py), read back by gguf-py's dequantizer, the reading llama.cpp does.

The grid is snapped to the format when it is built (fp16 super-block steps, integer sub-block multipliers), so
the exported bytes give back hf_qlimit's float32 weight bit for bit: gguf-py forms the same float32 products
(d·l, then ·q, less dmin·m) that hf_qlimit's dequantization does. A tiny Llama with rows of 256 and 512 weights
(the k-quants' super-blocks are 256 long).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import logits
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_qlimit import QLimitConfig
from hf_qlimit.export import ExportError, export
from hf_qlimit.export.gguf_blocks import encode_quantized
from hf_qlimit.export.gguf_kquants import encode_kquant
from hf_qlimit.models import base
from hf_qlimit.quantizers.kquant import K_LAYOUTS, SUPER_BLOCK, KQuantizer

gguf = pytest.importorskip("gguf")

FORMATS = list(K_LAYOUTS)
VOCAB = 96
# the embedding and head on the format itself where a k-quant is GGUF's type for their bits (2, 3, 6)
FIRST_LAST = {"gguf:q2_k": 2, "gguf:q3_k": 3, "gguf:q4_k": 8, "gguf:q5_k": 8, "gguf:q6_k": 6}
# a reconstruction per format, every rounding and both starts among them; learn_weight_scale asked for (and
# left off on the fixed grid: the structure checks below would fail otherwise)
RECONSTRUCTION = {
    "gguf:q2_k": {"rounding": "anneal", "weight_init": "gptq"},
    "gguf:q3_k": {"rounding": "sign"},
    "gguf:q4_k": {"rounding": "sign", "weight_init": "gptq"},
    "gguf:q5_k": {"rounding": "progressive"},
    "gguf:q6_k": {"rounding": "anneal", "weight_init": "gptq"},
}


def _llama(intermediate: int = 512, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _calib(n: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g)} for _ in range(n)]


def _quantized(fmt: str, method: str, **overrides) -> LlamaForCausalLM:
    model = _llama(**overrides)
    extra = {} if method == "rtn" else {"iters": 4, "learn_weight_scale": True, **RECONSTRUCTION[fmt]}
    config = QLimitConfig(weight_format=fmt, method=method, first_last_bits=FIRST_LAST[fmt], **extra)
    model.quantize_qlimit(_calib(), config)
    return model


def _kquant_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight_quantizer", None), KQuantizer)}


def _check_structure(quantizer: KQuantizer) -> None:
    """The grid is the format's: fp16 steps, integer multipliers in range, s = d·l and o = dmin·m exactly."""
    layout, per = quantizer.layout, SUPER_BLOCK // quantizer.group_size
    d, mult = quantizer.super_scale, quantizer.sub_scale
    assert torch.equal(d.half().float(), d) and bool((d > 0).all())
    assert 1 <= int(mult.min()) and int(mult.max()) <= layout.scale_max
    assert torch.equal(quantizer.scale, d.repeat_interleave(per, dim=1) * mult.float())
    if quantizer.symmetric:
        assert bool((quantizer.zero == 2 ** (quantizer.bits - 1)).all())
    else:
        dmin = quantizer.super_min
        assert torch.equal(dmin.half().float(), dmin) and int(quantizer.sub_min.max()) <= layout.min_max
        assert bool((quantizer.zero == 0).all())


@pytest.mark.parametrize("method", ["rtn", "brecq"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_reads_back_the_very_weights_and_a_reload_the_very_logits(fmt, method, tmp_path):
    model = _quantized(fmt, method)
    modules = _kquant_modules(model)
    expected_kquant = {n for n, s in model.config.quantization_config.layer_config.items() if s["format"] == fmt}
    assert set(modules) == expected_kquant and len(modules) >= 7
    ids = _calib(1)[0]["input_ids"].unsqueeze(0)
    encoded = {}
    for name, module in modules.items():
        _check_structure(module.weight_quantizer)
        kind, data = encode_kquant(module)
        assert kind == fmt.removeprefix("gguf:").upper()  # "gguf:q4_k" -> "Q4_K"
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        assert data.dtype == np.uint8 and data.shape == (module.rows, module.cols // block_size * type_size)
        weight = module.dequantize_rows()
        # bit for bit: gguf-py's float32 arithmetic is hf_qlimit's
        assert np.array_equal(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]), weight.numpy()), name
        if name.endswith("embed_tokens"):
            assert torch.equal(module(ids), weight[ids])
        else:  # packed inference: no kernel takes a k-quant grid with offsets, the plain path is exact
            x = torch.randn(3, module.cols)
            assert torch.equal(module(x), F.linear(x, weight, module.bias))
        encoded[name] = data
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, ids), expected)
    for name, module in _kquant_modules(reloaded).items():
        assert np.array_equal(encode_kquant(module)[1], encoded[name]), name


@pytest.mark.parametrize("fmt", ["gguf:q4_k", "gguf:q2_k"])
def test_the_offset_grids_learn_on_the_grid_they_export(fmt):
    """While AdaRound learns, x·(q·s − o)ᵀ comes from the rounding's x·(q·s)ᵀ less the group sums of x times o:
    the same layer (to float32 rounding) as the fake-quantized weight, with gradients to V and x."""
    quantizer = KQuantizer(fmt, (64, 512))
    weight = torch.randn(64, 512) * 0.02
    quantizer.init_range(weight, 2.4)
    _check_structure(quantizer)
    state = quantizer.begin_adaround(weight)
    x = torch.randn(5, 512, requires_grad=True)
    with torch.enable_grad():
        y = quantizer.linear(x, None)
        y.sum().backward()
    assert torch.allclose(y, F.linear(x, quantizer(weight)), atol=1e-5)
    assert x.grad is not None and state.alpha.grad is not None
    quantizer.finish_learning()
    assert torch.equal(quantizer(weight), quantizer.dequantize(next(quantizer.code_chunks(weight))[1]))
    quantizer.clear_rounding()  # round to nearest from the FP weight: the codes AdaRound started from
    assert torch.equal(quantizer(weight), quantizer.dequantize(next(quantizer.code_chunks(weight))[1]))


def test_rows_that_do_not_split_into_super_blocks_take_llama_cpps_fallback():
    model = _llama(intermediate=576)  # down_proj's rows: 576 weights, not a multiple of 256 (but of 32)
    with CaptureLogger(logging.get_logger(base.__name__)) as captured:
        model.quantize_qlimit(_calib(1), QLimitConfig(weight_format="gguf:q3_k", method="rtn"))
    layers = model.config.quantization_config.layer_config
    assert layers["model.layers.0.mlp.down_proj"]["format"] == "gguf:q4_0"
    assert layers["model.layers.0.mlp.up_proj"]["format"] == "gguf:q3_k"  # 256-long rows
    assert captured.out.count("gguf:q3_k needs rows") == 1
    assert "model.layers.0.mlp.down_proj take gguf:q4_0" in captured.out
    down = model.model.layers[0].mlp.down_proj.weight_quantizer
    assert not isinstance(down, KQuantizer) and (down.bits, down.group_size, down.symmetric) == (4, 32, True)


def test_config_and_the_exporters_encodings(tmp_path):
    config = QLimitConfig(weight_format="gguf:q5_k")
    assert (config.weight_bits, config.group_size, config.weight_sym, config.act_bits) == (5, 32, False, None)
    with pytest.raises(ValueError, match="contradicts weight_bits=3"):
        QLimitConfig(weight_format="gguf:q6_k", weight_bits=3)
    model = _quantized("gguf:q4_k", "rtn")
    with pytest.raises(ExportError, match="k-quant grid with a float offset.*format='gguf'"):
        export(model, tmp_path / "ct")
    # the GGUF exporter's encoding takes the k-quant layout (its grid would pass for Q4_1's, without the offsets)
    down = model.model.layers[0].mlp.down_proj
    kind, data = encode_quantized(down)
    assert kind == "Q4_K" and np.array_equal(data, encode_kquant(down)[1])
