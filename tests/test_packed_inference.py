"""Packed inference: after quantization or `from_pretrained` the weights stay packed, weight-only Linears run
through torch's int4 / int8 kernels (bfloat16 activations) and the result stays the fake-quantized model's."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_samples, decoder_calib, tiny_bert, tiny_decoder, tiny_opt
from torch import nn

from hf_qlimit import QLimitConfig
from hf_qlimit.nn import kernels
from hf_qlimit.nn.embedding import QuantEmbedding
from hf_qlimit.nn.modules import QuantLinear, set_inference_mode
from hf_qlimit.nn.packing import pack_codes

# The kernels take bfloat16 activations and scales (8 significant bits): a tiny 2-layer model's logits then
# differ from the float fake quantization by well under 1 % of their range. Measured here: about 0.3 %.
BF16_TOLERANCE = 0.01


def _quantized(kind: str, **overrides) -> nn.Module:
    build = {
        "bert": tiny_bert,
        "opt": tiny_opt,
        "llama": lambda: tiny_decoder("llama"),
        "llama-untied": lambda: tiny_decoder("llama", tie=False),
    }[kind]
    model = build()
    settings = {
        "weight_bits": 4,
        "act_bits": None,
        "group_size": 32,
        "method": "rtn",
        "num_samples": 8,
        "batch_size": 4,
    }
    data = decoder_calib(8) if kind.startswith("llama") else calib_samples(8)  # the tiny Llama has a smaller vocabulary
    return model.quantize_qlimit(data, QLimitConfig(**{**settings, **overrides}))


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, mode: str) -> torch.Tensor:
    set_inference_mode(model, mode)
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("kind", ["llama", "opt", "bert"])
def test_packed_kernels_equal_fake_quantization(kind):
    model = _quantized(kind)
    exact = _logits(model, "dequantize")
    packed = _logits(model, "packed")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m._kernel is not None for m in linears), "every W4 g32 / W8 g32 Linear should run a kernel"
    assert {m._kernel.kind for m in linears} == {"int4", "int8"}  # blocks at 4 bits, the head at 8
    error = (packed - exact).abs().max() / exact.abs().max()
    assert error < BF16_TOLERANCE
    assert not torch.equal(packed, exact)  # the kernel path really ran (bfloat16 leaves a trace)
    torch.testing.assert_close(_logits(model, "cached"), exact, rtol=0, atol=0)


def _quantized_llama(reload: bool, folder) -> nn.Module:
    """The tiny Llama quantized by `_quantized`, as returned, or saved to `folder` and loaded back."""
    from transformers import AutoModelForCausalLM

    model = _quantized("llama")
    if not reload:
        return model
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("reload", [False, True])
def test_no_float_copy_after_a_forward(reload, tmp_path):
    """The default, straight after quantization and after `from_pretrained`: packed, no fp32 copy."""
    model = _quantized_llama(reload, tmp_path)
    before = tensor_bytes(model)
    with torch.no_grad():
        model(input_ids=_ids())
    assert all(m._kernel is not None for m in model.modules() if isinstance(m, QuantLinear))
    grown = tensor_bytes(model) - before
    # The kernel layouts hold as many code bytes as the packed buffers; only bf16 scale/offset pairs are added
    # (4 bytes per group of 32 codes = 1/8 byte per weight), far below an fp32 copy (4 bytes per weight).
    weights = sum(m.rows * m.cols for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    assert grown <= weights / 8
    _logits(model, "cached")
    linear_weights = sum(m.rows * m.cols for m in model.modules() if isinstance(m, QuantLinear))
    assert tensor_bytes(model) - before >= 4 * linear_weights  # the cached mode: an fp32 copy of each Linear


@pytest.mark.parametrize("reload", [False, True])
def test_a_tied_embedding_reads_its_codes_from_the_head(reload, tmp_path):
    model = _quantized_llama(reload, tmp_path)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.reads_head_codes and "weight" not in emb._buffers
    assert emb.weight_quantizer.group_size == head.weight_quantizer.group_size == 32  # the head's grid
    state = model.state_dict()
    assert torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])
    assert state["model.embed_tokens.weight"].data_ptr() != state["lm_head.weight"].data_ptr()  # saved twice
    exact = _logits(model, "dequantize")
    packed = _logits(model, "packed")
    assert head._kernel is not None and head._kernel.kind == "int8"  # the embedding gathers from its layout
    shared = tensor_bytes(model)
    emb.untie_codes()
    assert tensor_bytes(model) - shared == emb.rows * emb.cols  # one byte per 8-bit code is what sharing saves
    assert torch.equal(_logits(model, "packed"), packed) and torch.equal(_logits(model, "dequantize"), exact)


def test_an_untied_embedding_keeps_its_own_grid_and_codes():
    model = _quantized("llama-untied")
    emb = model.get_input_embeddings()
    assert not emb.reads_head_codes and emb.weight_quantizer.group_size is None  # one scale per row, as before
    assert "group" not in model.config.quantization_config.layer_config["model.embed_tokens"]


def test_activation_quantized_models_keep_exact_fake_quantization():
    model = _quantized("llama", act_bits=8)
    assert torch.equal(_logits(model, "packed"), _logits(model, "dequantize"))
    assert all(m._kernel is None for m in model.modules() if isinstance(m, QuantLinear))


def test_layouts_without_a_kernel_dequantize_exactly():
    model = _quantized("llama", weight_bits=3, group_size=16, first_last_bits=None)
    assert torch.equal(_logits(model, "packed"), _logits(model, "dequantize"))
    assert all(m._kernel is None for m in model.modules() if isinstance(m, QuantLinear))


def test_kernel_layout_is_never_saved_and_leaves_with_a_move(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _quantized("llama")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    packed = _logits(model, "packed")
    after = model.state_dict()  # while the weights sit in the kernels' layouts
    assert after.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(after[key], value), key
    layer = model.model.layers[0].mlp.up_proj
    assert layer._kernel is not None and torch.equal(
        layer.weight.view(torch.uint8), saved["model.layers.0.mlp.up_proj.weight"]
    )
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded, "packed"), packed)
    model.to("cpu")  # any move hands the codes back; the next forward takes the kernel again
    assert layer._kernel is None and torch.equal(
        layer.weight.view(torch.uint8), saved["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(_logits(model, "packed"), packed)


@pytest.mark.parametrize("rows,cols,group", [(48, 64, 32), (64, 256, None), (96, 128, 128)])
def test_int4_layout_round_trips_exactly_and_matches_the_dequantized_matmul(rows, cols, group):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    groups = 1 if group is None else cols // group
    scale = torch.rand(rows, groups, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 16, (rows, groups), generator=g, dtype=torch.uint8)
    chosen = kernels.plan(4, rows, cols, group, torch.device("cpu"))
    weight, sz = kernels.prepare_int4(pack_codes(codes, 4).reshape(-1), scale, zero, cols, chosen.group)
    assert torch.equal(kernels.unpack_int4(weight, rows, cols), pack_codes(codes, 4).reshape(-1))
    dense = ((codes.float().reshape(rows, groups, -1) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(rows, cols)
    x = torch.randn(3, cols, generator=g)
    ref = x.bfloat16().float() @ dense.t()
    out = kernels.int4_linear(x, weight, sz, chosen.group, rows).float()
    assert (out - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_grouped_kernel_with_zero_points(symmetric):
    rows, cols, group = 40, 96, 32
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    scale = torch.rand(rows, cols // group, generator=g) * 0.01 + 0.001
    if symmetric:
        zero = torch.full_like(scale, 128, dtype=torch.uint8)
    else:
        zero = torch.randint(0, 256, scale.shape, generator=g, dtype=torch.uint8)
    weight, scales, offset = kernels.prepare_int8(codes.reshape(-1), scale, zero, cols, group)
    assert (offset is None) == symmetric
    assert torch.equal(kernels.unpack_int8(weight), codes.reshape(-1))
    dense = ((codes.float().reshape(rows, -1, group) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(rows, cols)
    x = torch.randn(2, 5, cols, generator=g)
    ref = x @ dense.t()
    out = kernels.int8_linear(x, weight, scales, offset)
    assert out.shape == (2, 5, rows)
    assert (out - ref).abs().max() <= 0.01 * ref.abs().max()


def test_int8_kernel_refuses_rows_it_would_read_past():
    assert kernels.plan(8, 32, 37, None, torch.device("cpu")) is None
    assert kernels.plan(8, 32, 40, None, torch.device("cpu")).kind == "int8"
    assert kernels.plan(4, 32, 64, 16, torch.device("cpu")) is None  # group 16: not a size the int4 kernel takes
    assert kernels.plan(2, 32, 64, 32, torch.device("cpu")) is None


def test_unknown_inference_mode_is_refused():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        set_inference_mode(nn.Linear(2, 2), "fast")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        QuantLinear(2, 2, False, 4, None).set_inference_mode("fast")


def test_the_inference_mode_is_per_module_and_never_saved():
    model = _quantized("llama")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("cached", "dequantize", "packed"):
        _logits(model, mode)
        assert {m.inference_mode for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))} == {mode}
        state = model.state_dict()
        assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)


def test_a_kernel_failing_at_its_first_call_falls_back_to_exact_dequantization(monkeypatch):
    """A torch build may lack an op for a device (the int8 one on older CUDA builds): the layer then stays exact."""
    model = _quantized("llama")
    exact = _logits(model, "dequantize")
    set_inference_mode(model, "packed")

    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel for this backend")

    monkeypatch.setattr(kernels, "int4_linear", missing)
    with torch.no_grad():
        got = model(input_ids=_ids()).logits
    blocks = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_quantizer.bits == 4]
    assert all(m._kernel is None and m._kernel_failed for m in blocks)
    assert (got - exact).abs().max() < BF16_TOLERANCE * exact.abs().max()  # the 8-bit head still ran its kernel
    x = torch.randn(2, blocks[0].cols)
    assert torch.equal(blocks[0](x), torch.nn.functional.linear(x, blocks[0].dequantize_rows()))


def test_packed_layers_pass_gradients_to_their_inputs():
    """Outside no_grad (a forward that records a graph, e.g. for adapters on top) the kernels still run, and the
    input gets the gradient of the dequantized weight."""
    model = _quantized("llama")
    layer = model.model.layers[0].mlp.down_proj
    set_inference_mode(model, "packed")
    x = torch.randn(3, layer.cols, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer._kernel is not None
    weight = layer.dequantize_rows()
    xr = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xr, weight).pow(2).sum().backward()
    assert (x.grad - xr.grad).abs().max() <= BF16_TOLERANCE * xr.grad.abs().max()
