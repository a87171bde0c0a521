"""Issue 19 transforms on tiny BERT (post-LN), OPT and Llama (pre-LN): each keeps the FP function, folds into
the norms where a norm feeds only the Linears, and a transformed, quantized model reloads bit-exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import AUTO, DECODER_VOCAB, TINY, calib_all_models, calib_samples, logits

from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration
from hf_qlimit.models import get_adapter
from hf_qlimit.transforms import InputTransform, apply_transforms
from hf_qlimit.transforms.hadamard import hadamard, rotate

TRANSFORMS = [
    ["smoothquant"],
    ["smoothquant@0.8"],
    ["os_plus"],
    ["hadamard_down"],
    ["hadamard_inputs"],
    ["os_plus", "hadamard_inputs"],
]


@pytest.fixture
def ids(inputs) -> torch.Tensor:
    return inputs % DECODER_VOCAB  # valid for every tiny model here


def _spread(model: torch.nn.Module) -> None:
    """Outlier channels in the norms, as trained models have them, so the transforms have work to do."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.mul_(1 + 4 * torch.rand(p.shape, generator=g)).add_(0.3 * torch.randn(p.shape, generator=g))


def _transformed(arch: str, names: list[str]):
    model = TINY[arch]()
    _spread(model)
    config = QLimitConfig(transforms=names, method="rtn", batch_size=8)
    batches = length_sorted_batches(prepare_calibration(calib_all_models(), 16, 64, 0), 8)
    return model, config, batches


@pytest.mark.parametrize("n", [12, 20, 32, 96, 576, 1536, 2048])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(rotate(x), x @ h, atol=1e-12)  # the fast online op is the same rotation


def test_hadamard_fallback_is_block_diagonal_and_orthogonal():
    h = hadamard(148, torch.float64)  # 148 = 4 · 37: no Paley order, four-channel blocks
    assert torch.allclose(h @ h.T, torch.eye(148, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 148, dtype=torch.float64)
    assert torch.allclose(rotate(x), x @ h, atol=1e-12)


@pytest.mark.parametrize("arch", ["bert", "opt", "llama"])
@pytest.mark.parametrize("names", TRANSFORMS, ids="+".join)
def test_transform_keeps_fp_outputs(arch, names, ids):
    model, config, batches = _transformed(arch, names)
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_transforms(model, get_adapter(model), config, batches, torch.device("cpu"))
    after = logits(model, ids)
    now = model.state_dict()
    assert set(now) != set(state) or any(not torch.equal(now[k], v) for k, v in state.items()), "nothing changed"
    assert torch.allclose(after, before, atol=1e-4 * before.abs().max().item(), rtol=0), (after - before).abs().max()


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_pre_ln_channel_factors_fold_into_the_norms(arch):
    """Pre-LN: SmoothQuant leaves an ordinary model (no explicit op): the factors live in the norms."""
    model, config, batches = _transformed(arch, ["smoothquant"])
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    apply_transforms(model, get_adapter(model), config, batches, torch.device("cpu"))
    assert not [m for m in model.modules() if isinstance(m, InputTransform)]
    assert any(not torch.equal(p, norms_before[n]) for n, p in model.named_parameters() if n in norms_before)


def test_post_ln_bert_keeps_an_explicit_op():
    """Post-LN: the LayerNorm output also feeds the residual, so it must not absorb the factors."""
    model, config, batches = _transformed("bert", ["smoothquant"])
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    apply_transforms(model, get_adapter(model), config, batches, torch.device("cpu"))
    ops = [n for n, m in model.named_modules() if isinstance(m, InputTransform)]
    assert len(ops) == 2 * 4  # q, k, v, intermediate.dense in each of the 2 blocks
    attention = model.bert.encoder.layer[0].attention.self
    q, k, v = attention.query, attention.key, attention.value  # one tensor, one transform: one quantizer can serve
    assert torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, v.smooth)
    assert all(torch.equal(p, norms_before[n]) for n, p in model.named_parameters() if n in norms_before)


@pytest.mark.parametrize("arch", ["bert", "opt", "llama"])
@pytest.mark.parametrize("names", [["smoothquant", "hadamard_down"], ["os_plus", "hadamard_inputs"]], ids="+".join)
def test_transformed_quantized_model_reloads_bit_exact(arch, names, ids, tmp_path):
    model, _, _ = _transformed(arch, names)
    config = QLimitConfig(
        weight_bits=4,
        act_bits=4,
        method="rtn",
        batch_size=8,
        transforms=names,
        act_layout="shared",
        prob_grid="log2",
        prob_bits=8,
    )
    model.quantize_qlimit(calib_all_models(), config)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    reloaded = AUTO[arch].from_pretrained(tmp_path / "q")
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(logits(reloaded, ids), expected)


def test_unknown_transform_is_an_error():
    model, _, _ = _transformed("bert", [])
    with pytest.raises(ValueError, match="Unknown transform"):
        model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn", transforms=["rotate_everything"]))


def test_reconstructed_transformed_model_reloads_bit_exact(ids, tmp_path):
    """QDrop (GPTQ start, learned steps) on the transformed inputs, shared quantizers: still exact after reload."""
    model, _, _ = _transformed("bert", ["os_plus", "hadamard_inputs"])
    config = QLimitConfig(
        weight_bits=4,
        act_bits=4,
        method="qdrop",
        iters=3,
        num_samples=8,
        batch_size=4,
        transforms=["os_plus", "hadamard_inputs"],
        act_layout="shared",
    )
    model.quantize_qlimit(calib_all_models(), config)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(AUTO["bert"].from_pretrained(tmp_path / "q"), ids), expected)
