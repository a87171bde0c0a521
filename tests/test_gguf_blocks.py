"""GGUF block encodings (export/gguf_blocks.py) read back by gguf-py's own dequantizer, the reading llama.cpp does.

Each mapped grid must give back hf_qlimit's very values with the scale (and Q4_1 / Q5_1's offset m = −s·z)
rounded to float16, bit for bit, and so hf_qlimit's dequantized weight within float16 rounding. Grids without a
GGUF type return None with the reason.
"""

from __future__ import annotations

import pytest
import torch
from helpers import decoder_calib, tiny_decoder
from torch import nn

from hf_qlimit import QLimitConfig
from hf_qlimit.export.gguf_blocks import encode_quantized, module_gguf_choice
from hf_qlimit.nn.embedding import QuantEmbedding
from hf_qlimit.nn.experts import QuantExpertWeight
from hf_qlimit.nn.modules import QuantLinear
from hf_qlimit.nn.packing import pack_codes
from hf_qlimit.nn.wrapped_embedding import QuantWrappedEmbedding
from hf_qlimit.quantizers.gguf_types import gguf_choice, gguf_type_for

gguf = pytest.importorskip("gguf")

TYPES = [("Q4_0", 4, True), ("Q4_1", 4, False), ("Q5_0", 5, True), ("Q5_1", 5, False), ("Q8_0", 8, True)]
GROUPS = [(32, 256), (64, 256), (128, 256), (None, 256), (None, 96)]  # (group_size, row length)
SYMMETRIC = {"Q4_0", "Q5_0", "Q8_0"}


def _filled(module: nn.Module, symmetric: bool, seed: int = 0) -> nn.Module:
    """A frozen module given random codes (every code of its bits), scales and zeros (the middle code if
    `symmetric`, any code otherwise)."""
    quantizer, gen = module.weight_quantizer, torch.Generator().manual_seed(seed)
    top = 2**quantizer.bits
    codes = torch.randint(0, top, (module.rows, module.cols), generator=gen, dtype=torch.uint8)
    module.register_buffer("weight", pack_codes(codes, quantizer.bits).reshape(-1))
    quantizer.scale.copy_(torch.exp(torch.randn(quantizer.scale.shape, generator=gen)) * 1e-2)
    zero = torch.randint(0, top, quantizer.zero.shape, generator=gen, dtype=torch.uint8)
    quantizer.zero.copy_(torch.full_like(zero, top // 2) if symmetric else zero)
    return module


def _linear(bits: int, group: int | None, symmetric: bool, cols: int = 256, rows: int = 8) -> QuantLinear:
    return _filled(QuantLinear(cols, rows, False, bits, None, group, symmetric), symmetric)


def _gguf_values(module: nn.Module) -> tuple[str, torch.Tensor]:
    kind, data = encode_quantized(module)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype.name == "uint8" and data.shape == (module.rows, module.cols // block * type_size)
    return kind, torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(module.rows, module.cols)


def _fp16_grid_values(module: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hf_qlimit's values with d = fp16(s) (and m = fp16(−s·z)), in the arithmetic gguf-py uses, and a bound on
    their distance to hf_qlimit's own float32 values (the fp16 rounding of d and m, float32 slack)."""
    quantizer = module.weight_quantizer
    codes = module.code_rows().float().reshape(module.rows, quantizer.scale.shape[1], -1)
    scale, zero = quantizer.scale.unsqueeze(-1), quantizer.zero.float().unsqueeze(-1)
    d = scale.half().float()
    half_ulp = lambda x: torch.clamp(x.abs() * 2**-11, min=2**-25)  # noqa: E731  fp16 rounding, subnormals too
    if kind in SYMMETRIC:
        values, bound = d * (codes - zero), half_ulp(scale) * (codes - zero).abs()
    else:
        m = (-scale * zero).half().float()
        values, bound = d * codes + m, half_ulp(scale) * codes + half_ulp(scale * zero)
    bound = bound + scale * (codes + zero) * 2**-21  # float32 rounding of both computations
    return values.reshape(module.rows, -1), bound.reshape(module.rows, -1)


def _assert_exact(module: nn.Module, expected_kind: str) -> None:
    kind, got = _gguf_values(module)
    assert kind == expected_kind
    values, bound = _fp16_grid_values(module, kind)
    assert torch.equal(got, values)  # same codes, same layout: nothing but d and m rounds
    assert ((got - module.dequantize_rows()).abs() <= bound).all()


@pytest.mark.parametrize("group,cols", GROUPS)
@pytest.mark.parametrize("kind,bits,symmetric", TYPES)
def test_linear_blocks_read_back_by_gguf_as_hf_qlimits_values(kind, bits, symmetric, group, cols):
    module = _linear(bits, group, symmetric, cols)
    assert gguf_type_for(bits, group, symmetric, cols) == kind
    _assert_exact(module, kind)


@pytest.mark.parametrize("cls", [QuantEmbedding, QuantWrappedEmbedding])
@pytest.mark.parametrize("kind,bits,symmetric", TYPES)
def test_embedding_blocks_read_back_by_gguf(kind, bits, symmetric, cls):
    rows, cols = 20, 128
    if cls is QuantEmbedding:
        module = cls(rows, cols, None, bits, symmetric, group_size=64)
    else:
        module = cls(nn.Embedding(rows, cols), bits, symmetric, group_size=64)
    _assert_exact(_filled(module, symmetric, seed=1), kind)


def test_a_grid_maps_as_it_stands_not_as_configured():
    module = _linear(4, 32, symmetric=False)
    module.weight_quantizer.zero.fill_(8)  # asymmetric by config, every zero at the middle code: Q4_0 holds it
    _assert_exact(module, "Q4_0")
    module = _linear(8, 32, symmetric=False)
    module.weight_quantizer.zero.fill_(128)
    _assert_exact(module, "Q8_0")


@pytest.mark.parametrize(
    "bits,group,symmetric,cols,reason",
    [
        (8, 32, False, 256, "8-bit asymmetric has no GGUF type: use weight_sym=True"),
        (4, 16, True, 256, "group 16 is smaller than GGUF's blocks of 32"),
        (5, 48, False, 96, "group 48 is not a multiple of GGUF's blocks of 32"),
        (5, None, False, 48, "row length 48 is not a multiple of GGUF's blocks of 32"),
        (4, None, True, 16, "row length 16 is not a multiple"),
        (3, 32, False, 256, "3-bit grids have no GGUF block type"),
        (6, 32, True, 256, "6-bit grids have no GGUF block type"),
        (2, None, False, 64, "2-bit grids have no GGUF block type"),
    ],
)
def test_grids_without_a_gguf_type_give_none_and_why(bits, group, symmetric, cols, reason):
    assert gguf_choice(bits, group, symmetric, cols).type_name is None
    assert reason in gguf_choice(bits, group, symmetric, cols).reason
    assert gguf_type_for(bits, group, symmetric, cols) is None
    module = _linear(bits, group, symmetric, cols)
    assert encode_quantized(module) is None
    assert reason in module_gguf_choice(module).reason


def test_experts_and_out_of_range_scales_fall_back_to_float():
    experts = QuantExpertWeight(2, 32, 64, False, 4, group_size=32, weight_sym=True)
    assert encode_quantized(_filled(experts, symmetric=True)) is None  # a grid Q4_0 holds, but not for experts
    assert "QuantExpertWeight" in module_gguf_choice(experts).reason
    module = _linear(4, 32, symmetric=True)
    module.weight_quantizer.scale[0, 0] = 1e5  # float16 would make it inf
    assert encode_quantized(module) is None and "float16" in module_gguf_choice(module).reason
    module = _linear(5, 32, symmetric=False)
    module.weight_quantizer.scale[0, 0], module.weight_quantizer.zero[0, 0] = 1e4, 31  # d fits, m = −3.1e5 not
    assert encode_quantized(module) is None and "float16" in module_gguf_choice(module).reason


def _tiny_llama(tie: bool, **settings) -> nn.Module:
    base = {"act_bits": None, "method": "rtn", "num_samples": 8, "batch_size": 4}
    return tiny_decoder("llama", tie=tie).quantize_qlimit(decoder_calib(8), QLimitConfig(**{**base, **settings}))


@pytest.mark.parametrize("bits,symmetric,kind,first_last", [(4, True, "Q4_0", "Q8_0"), (5, False, "Q5_1", None)])
def test_a_quantized_llamas_linears_map_exactly(bits, symmetric, kind, first_last):
    model = _tiny_llama(False, weight_bits=bits, weight_sym=symmetric, group_size=32)
    linears = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert len(linears) == 14
    for module in linears:
        _assert_exact(module, kind)
    # embedding and head: 8 bits, one scale per row, symmetric as weight_sym says; asymmetric has no GGUF type
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if first_last is None:
            assert encode_quantized(module) is None and "8-bit asymmetric" in module_gguf_choice(module).reason
        else:
            _assert_exact(module, first_last)


def test_an_embedding_reading_the_heads_codes_encodes_them():
    model = _tiny_llama(True, weight_bits=4, weight_sym=True, group_size=32)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.reads_head_codes  # 8-bit symmetric at the head's grid: shared codes
    with torch.no_grad():
        model(input_ids=torch.arange(3, 12).reshape(1, -1))
    assert head._kernel is not None  # its codes now sit in the int8 kernel's layout, which packed_weight() undoes
    _assert_exact(emb, "Q8_0")
    _assert_exact(head, "Q8_0")
    assert (encode_quantized(emb)[1] == encode_quantized(head)[1]).all()
