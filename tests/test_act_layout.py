"""Issue 19 quantizer options: one input quantizer per tensor (act_layout="shared"), the attention
probabilities' own grid (bits, log2) and dynamic per-token Linear inputs; each survives save -> reload exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import AUTO, DECODER_VOCAB, STATIC_ACTIVATIONS, TINY, calib_all_models, logits

from hf_qlimit import QLimitConfig
from hf_qlimit.models import get_adapter
from hf_qlimit.nn.attention import ATTENTION_ATTR
from hf_qlimit.nn.modules import QuantLinear
from hf_qlimit.quantizers import ActQuantizer
from hf_qlimit.quantizers.act_grids import DynamicTokenQuantizer, Log2Quantizer, UnitQuantizer


def _quantize(arch: str, **kwargs):
    model = TINY[arch]()
    config = {"weight_bits": 4, "act_bits": 4, "method": "rtn", "batch_size": 8, **STATIC_ACTIVATIONS, **kwargs}
    model.quantize_qlimit(calib_all_models(), QLimitConfig(**config))
    return model


def _input_quantizers(model, arch: str) -> list[list[ActQuantizer]]:
    """Per block and per input group of the adapter, the input quantizers of the Linears reading that tensor."""
    adapter = get_adapter(model)
    out = []
    for block in adapter.blocks(model):
        for group in adapter.input_groups():
            linears = [block.get_submodule(rel) for rel in group]
            linears = [getattr(m, "linear", m) for m in linears]
            assert all(isinstance(m, QuantLinear) for m in linears)
            out.append([m.input_quantizer for m in linears])
    return out


@pytest.mark.parametrize("arch", ["bert", "opt", "llama"])
def test_shared_layout_has_one_quantizer_per_input_tensor(arch, tmp_path, inputs):
    ids = inputs % DECODER_VOCAB
    model = _quantize(arch, act_layout="shared", method="qdrop", iters=3, num_samples=8, batch_size=4)
    groups = _input_quantizers(model, arch)
    assert any(len(g) > 1 for g in groups)
    for group in groups:
        assert len({id(q) for q in group}) == 1  # Q/K/V (gate/up) read one tensor: one quantizer
    distinct = {id(q) for g in groups for q in g}
    assert len(distinct) == len(groups)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO[arch].from_pretrained(tmp_path / "q")
    for group in _input_quantizers(reloaded, arch):
        assert len({id(q) for q in group}) == 1
    assert torch.equal(logits(reloaded, ids), expected)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_per_linear_layout_keeps_a_quantizer_per_linear(arch):
    groups = _input_quantizers(_quantize(arch), arch)
    assert all(len({id(q) for q in g}) == len(g) for g in groups)


def test_probability_grid_options_are_rebuilt(tmp_path, inputs):
    model = _quantize("bert", prob_bits=8)
    assert getattr(model.bert.encoder.layer[0].attention.self, ATTENTION_ATTR).probs.bits == 8
    model = _quantize("bert", prob_grid="log2")
    probs = getattr(model.bert.encoder.layer[0].attention.self, ATTENTION_ATTR).probs
    assert isinstance(probs, Log2Quantizer) and probs.bits == 4
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO["bert"].from_pretrained(tmp_path / "q")
    assert isinstance(getattr(reloaded.bert.encoder.layer[1].attention.self, ATTENTION_ATTR).probs, Log2Quantizer)
    assert torch.equal(logits(reloaded, inputs), expected)


def test_log2_grid_levels():
    q = Log2Quantizer(3)  # levels 1, 1/2, ..., 1/64 and 0; rounded in the log domain (0 below 2^-6.5)
    x = torch.tensor([1.0, 0.6, 0.2, 0.012, 1 / 64, 0.01, 1e-4, 0.0])
    assert torch.equal(q(x), torch.tensor([1.0, 0.5, 0.25, 1 / 64, 1 / 64, 0.0, 0.0, 0.0]))


def test_dynamic_per_token_grid(tmp_path, inputs):
    q = DynamicTokenQuantizer(4)
    x = torch.tensor([[0.0, 1.0, 2.0, 15.0], [-3.0, 0.0, 0.0, 0.0]])
    out = q(x)
    assert torch.equal(out[0], torch.tensor([0.0, 1.0, 2.0, 15.0]))  # step 1 for the first token
    assert torch.equal(out[1], x[1])  # its own step 0.2 for the second: -3 is a grid point
    model = _quantize("bert", act_dynamic=True)
    linears = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".layer." in n]
    assert linears and all(isinstance(m.input_quantizer, DynamicTokenQuantizer) for m in linears)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO["bert"].from_pretrained(tmp_path / "q")
    assert torch.equal(logits(reloaded, inputs), expected)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="act_layout"):
        _quantize("bert", act_layout="tied")
    with pytest.raises(ValueError, match="prob_grid"):
        _quantize("bert", prob_grid="log10")


def _output_quantizers(model) -> list:
    return [getattr(block, "output_quantizer", None) for block in get_adapter(model).blocks(model)]


def test_block_output_layout_quantizes_post_ln_block_outputs(tmp_path, inputs):
    model = _quantize("bert", act_layout="block_output")
    blocks = get_adapter(model).blocks(model)
    outs = _output_quantizers(model)
    assert all(isinstance(q, ActQuantizer) for q in outs[:-1]) and outs[-1] is None  # the head quantizes its own
    assert blocks[0].attention.self.query.input_quantizer is not None  # the embeddings' LayerNorm output
    for block in blocks[1:]:
        qkv = [block.attention.self.query, block.attention.self.key, block.attention.self.value]
        assert all(m.input_quantizer is None for m in qkv)  # they read the previous block's quantized output
        assert block.intermediate.dense.input_quantizer is not None
    hidden = model.bert.embeddings(input_ids=inputs)
    out = blocks[0](hidden)
    out = out[0] if isinstance(out, tuple) else out
    q = outs[0]
    grid = (out / q.scale + q.zero.round()).detach()
    assert torch.allclose(grid, grid.round(), atol=1e-3)  # every value of the block output is on its grid
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO["bert"].from_pretrained(tmp_path / "q")
    assert all(isinstance(q, ActQuantizer) for q in _output_quantizers(reloaded)[:-1])
    assert torch.equal(logits(reloaded, inputs), expected)


def test_block_output_quantizer_is_trained_in_the_block_loss():
    """Only the reconstruction loss moves an activation step away from its calibrated start: at 0 iterations the
    step is the Lp search's, after some iterations of QDrop it has been learned through the block's own loss."""
    settings = {"act_layout": "block_output", "method": "qdrop", "num_samples": 8, "batch_size": 4, "act_lr": 0.05}
    start = [q.scale.item() for q in _output_quantizers(_quantize("bert", iters=0, **settings))[:-1]]
    learned = [q.scale.item() for q in _output_quantizers(_quantize("bert", iters=6, **settings))[:-1]]
    assert all(abs(a - b) > 1e-4 * abs(a) for a, b in zip(start, learned)), (start, learned)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_block_output_layout_is_shared_for_pre_ln_blocks(arch):
    """Pre-LN blocks output the residual stream, which stays unquantized; the layout then equals "shared"."""
    model = _quantize(arch, act_layout="block_output")
    assert all(q is None for q in _output_quantizers(model))
    assert all(len({id(q) for q in g}) == 1 and g[0] is not None for g in _input_quantizers(model, arch))


def test_unit_grid_is_fixed_and_never_clips():
    q = UnitQuantizer(8)  # levels k/255 over all of [0, 1]: a probability of 1 stays 1
    x = torch.tensor([1.0, 0.999, 0.5, 3 / 255, 0.001, 0.0])
    assert torch.equal(q(x), torch.round(x * 255) / 255) and q(x)[0] == 1.0
    q.observe()  # calibration sets nothing
    q(torch.full((4,), 0.01))
    q.finish_observing(2.4)
    assert torch.equal(q(x), torch.round(x * 255) / 255)
    step = q.begin_reconstruction(drop_prob=0.0)  # the step LSQ would learn is not read: no gradient reaches it
    xr = x.clone().requires_grad_(True)
    q(xr).sum().backward()
    assert step.grad is None and torch.equal(xr.grad, torch.ones_like(x))  # straight-through
    q.end_reconstruction()


def test_unit_grid_survives_reconstruction_and_reload(tmp_path, inputs):
    ids = inputs % DECODER_VOCAB
    model = TINY["llama"]()
    config = QLimitConfig(
        **{**STATIC_ACTIVATIONS, "prob_grid": "unit"},
        weight_bits=8,
        act_bits=8,
        method="qdrop",
        iters=3,
        num_samples=8,
        batch_size=4,
    )
    model.quantize_qlimit(calib_all_models(), config)
    attentions = [getattr(layer.self_attn, ATTENTION_ATTR) for layer in model.model.layers]
    assert all(type(a.probs) is UnitQuantizer and a.probs.bits == 8 for a in attentions)
    assert all(a.probs.scale.item() == 1.0 for a in attentions)  # nothing learned: the step is the definition's
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "q")
    assert all(type(getattr(la.self_attn, ATTENTION_ATTR).probs) is UnitQuantizer for la in reloaded.model.layers)
    assert torch.equal(logits(reloaded, ids), expected)
