"""The outlier transforms on the families of issue #30 (item 7), over the tiny models of tests/model_zoo.py.

Each supported family keeps its FP logits under the transforms; its norms absorb the channel factors where they
feed only Linears (Gemma's (1 + w) norms included), one norm feeding attention and MLP in parallel (Phi, Falcon)
gets one set of factors, MoE routers take the inverse factors, OLMo 2 (no norm before Q/K/V) keeps explicit ops.
`hadamard_inputs` needs no adapter. What a structure does not allow is refused with a message saying why.
Outlier channels are injected (norm gains and embedding columns x8) so that the transforms have work to do.
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import auto_class, build, calib, eval_batch, logits, relative_logit_error
from model_zoo import config as zoo_config
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration
from hf_qlimit.calibration.stacks import add_decoder_inputs
from hf_qlimit.models import GenericAdapter, get_adapter
from hf_qlimit.transforms import InputTransform, apply_transforms
from hf_qlimit.transforms.fold import fold_into_norm
from hf_qlimit.transforms.groups import channel_units

DENSE = ("qwen3", "granite", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt_neox", "falcon", "olmo2", "gpt2")
MOE = ("qwen3_moe", "mixtral")
GENERIC = ("distilbert", "electra", "modernbert", "deberta-v2", "t5")  # no adapter: hadamard_inputs only
DENSE_SETS = [["os_plus"], ["smoothquant", "hadamard_down"], ["os_plus", "hadamard_inputs"]]
MOE_SETS = [["smoothquant"], ["os_plus@0.7"]]
OUTLIERS = [3, 17, 26]


@torch.no_grad()
def _outliers(model: nn.Module, factor: float = 8.0) -> nn.Module:
    """A few channels x8 in every block norm's gain and in the input embedding, as trained models have them."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.shape == (32,):
            f = torch.ones_like(weight)
            f[OUTLIERS] = factor
            if "gemma" in type(module).__name__.lower():
                weight.copy_((1 + weight) * f - 1)  # Gemma's norm multiplies by 1 + w
            else:
                weight.mul_(f)
    model.get_input_embeddings().weight[:, OUTLIERS] *= factor
    return model


def _batches(model: nn.Module, model_type: str) -> list[dict[str, torch.Tensor]]:
    data = prepare_calibration(calib(model_type), 8, 16, 0)
    return add_decoder_inputs(model, length_sorted_batches(data, 4))


def _apply(model_type: str, names: list[str]) -> tuple[nn.Module, torch.Tensor]:
    """The transformed model and its FP logits before the transforms."""
    model = _outliers(build(model_type))
    before = logits(model, eval_batch(model_type))
    config = QLimitConfig(transforms=names, method="rtn")
    apply_transforms(model, get_adapter(model), config, _batches(model, model_type), torch.device("cpu"))
    return model, before


def _ops(model: nn.Module) -> list[InputTransform]:
    return [m for m in model.modules() if isinstance(m, InputTransform)]


CASES = [(t, names) for t in DENSE for names in DENSE_SETS] + [(t, names) for t in MOE for names in MOE_SETS]


@pytest.mark.parametrize(("model_type", "names"), CASES, ids=[f"{t}-{'+'.join(n)}" for t, n in CASES])
def test_transforms_keep_the_fp_logits(model_type, names):
    model, before = _apply(model_type, names)
    error = relative_logit_error(logits(model, eval_batch(model_type)), before)
    assert error < 1e-4, error
    channel_ops = [op for op in _ops(model) if op.smooth is not None]
    if names[0] in ("smoothquant", "os_plus", "os_plus@0.7"):  # folded into the norms, except where none precedes
        assert bool(channel_ops) == (model_type == "olmo2"), [type(op.linear).__name__ for op in channel_ops]
    if "hadamard_inputs" in names:  # every block Linear (or Conv1D) of the family
        assert len(_ops(model)) == len(_block_matmuls(build(model_type)))
        assert all(op.rotate for op in _ops(model))


def _block_matmuls(model: nn.Module) -> list[str]:
    stack = get_adapter(model).stacks(model)
    return [
        n
        for s in stack
        for n, m in s.blocks.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D", "FalconLinear")
    ]


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "falcon", "mixtral", "gpt2"])
def test_channel_factors_fold_into_the_norms(model_type):
    """An ordinary model afterwards: no op left, the norms changed (Gemma's by (1 + w') = (1 + w) / s)."""
    model = _outliers(build(model_type))
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n or ".ln_" in n}
    config = QLimitConfig(transforms=["smoothquant"], method="rtn")
    apply_transforms(model, get_adapter(model), config, _batches(model, model_type), torch.device("cpu"))
    assert not _ops(model)
    changed = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])]
    assert changed and all(".layers." in n or ".h." in n for n in changed)


def test_gemma_norm_folds_as_one_plus_w_and_an_unknown_norm_is_refused():
    torch.manual_seed(0)
    norm = GemmaRMSNorm(32)
    nn.init.uniform_(norm.weight, -0.5, 0.5)
    x, s = torch.randn(5, 32), torch.rand(32) + 0.5
    expected = norm(x) / s
    fold_into_norm(norm, None, s)
    assert torch.allclose(norm(x), expected, atol=1e-6)

    class TwoPlusNorm(GemmaRMSNorm):  # x̂·(2 + w): neither form the fold knows
        def forward(self, x):
            return self._norm(x) * (2.0 + self.weight)

    odd = TwoPlusNorm(32)
    before = odd.weight.clone()
    with pytest.raises(ValueError, match="computes neither"):
        fold_into_norm(odd, None, s)
    assert torch.equal(odd.weight, before)  # left as it was


@pytest.mark.parametrize(("model_type", "readers"), [("phi", 4), ("falcon", 2)])
def test_one_norm_feeding_attention_and_mlp_gets_one_set_of_factors(model_type, readers):
    """Phi: Q, K, V and fc1 read `input_layernorm`; Falcon-7B: the fused QKV and dense_h_to_4h. One unit per block."""
    model = build(model_type)
    units = channel_units(model, get_adapter(model))
    assert len(units) == model.config.num_hidden_layers
    assert all(unit.norm is not None and len(unit.readers.ops) == readers for unit in units)


def test_the_moe_router_takes_the_inverse_factors(monkeypatch):
    """Folded into post_attention_layernorm, the factors would change the router's input: its weight takes them
    back. Without that the transformed model's output moves, and the stage refuses it."""
    model, before = _apply("mixtral", ["smoothquant"])
    assert relative_logit_error(logits(model, eval_batch("mixtral")), before) < 1e-4
    adapter = get_adapter(model)
    monkeypatch.setattr(type(adapter), "norm_inputs", (adapter.norm_inputs[0], ("mlp.experts",)))
    with pytest.raises(ValueError, match="changed the FP output of model type 'mixtral'"):
        _apply("mixtral", ["smoothquant"])


@pytest.mark.parametrize("model_type", GENERIC)
def test_hadamard_inputs_needs_no_adapter(model_type):
    model = _outliers(build(model_type))
    assert isinstance(get_adapter(model), GenericAdapter)
    batch = eval_batch(model_type)
    before = logits(model, batch)
    config = QLimitConfig(transforms=["hadamard_inputs"], method="rtn")
    apply_transforms(model, get_adapter(model), config, _batches(model, model_type), torch.device("cpu"))
    assert relative_logit_error(logits(model, batch), before) < 1e-4
    assert len(_ops(model)) == len(_block_matmuls(build(model_type)))


REFUSED = [
    ("distilbert", ["smoothquant"], "GenericAdapter: model type 'distilbert' has no adapter saying which norms feed"),
    ("t5", ["os_plus", "hadamard_inputs"], "the channel transforms \\(os_plus\\) need it. hadamard_inputs works"),
    ("modernbert", ["hadamard_down"], "no adapter naming the FFN's second Linear \\(ffn_down\\)"),
    ("mixtral", ["hadamard_inputs"], "model.layers.0.mlp.experts holds fused MoE experts"),
    ("qwen3_moe", ["smoothquant", "hadamard_down"], "computed inside the fused MoE experts"),
]


@pytest.mark.parametrize(("model_type", "names", "message"), REFUSED, ids=[f"{t}-{'+'.join(n)}" for t, n, _ in REFUSED])
def test_what_the_structure_does_not_allow_is_refused(model_type, names, message):
    model = build(model_type)
    with pytest.raises(ValueError, match=message):
        model.quantize_qlimit(calib(model_type), QLimitConfig(method="rtn", act_bits=8, transforms=names))
    assert not _ops(model)  # refused before anything changed


def test_a_block_unlike_its_family_is_refused():
    """Qwen3-MoE with a dense MLP layer (mlp_only_layers): no router there, so the adapter's groups do not hold."""
    config = zoo_config("qwen3_moe")
    config.mlp_only_layers = [1]
    model = auto_class("qwen3_moe").from_config(config, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="block model.layers.1 has no 'mlp.gate'"):
        apply_transforms(model, get_adapter(model), QLimitConfig(transforms=["smoothquant"]), [], torch.device("cpu"))


def test_block_output_layout_needs_an_adapter():
    model = build("distilbert")
    config = QLimitConfig(act_bits=8, act_layout="block_output")
    with pytest.raises(ValueError, match="'distilbert' has no adapter saying whether a block's output feeds"):
        get_adapter(model).layer_config(model, config)


def test_olmo2_block_output_quantizes_the_next_blocks_qkv_input():
    """No norm before Q/K/V: a block's output is what the next block's Q/K/V read (and its residual)."""
    model = build("olmo2")
    plan = get_adapter(model).layer_config(model, QLimitConfig(act_bits=8, act_layout="block_output"))
    assert plan["model.layers.0"] == {"kind": "block_output", "a": 8}
    assert all(plan[f"model.layers.1.self_attn.{p}_proj"]["a"] is None for p in "qkv")
    assert "model.layers.1" not in plan  # the last block: the head quantizes its input


@pytest.mark.parametrize(
    ("model_type", "names"),
    [("gpt2", ["os_plus", "hadamard_inputs"]), ("olmo2", ["smoothquant", "hadamard_down"]), ("mixtral", ["os_plus"])],
)
def test_transformed_quantized_model_reloads_bit_exact(model_type, names, tmp_path):
    """GPT-2's Conv1D behind an op (its _init_weights reaches through to c_proj.weight), OLMo 2's explicit channel
    ops, Mixtral's folded factors."""
    model = _outliers(build(model_type))
    config = QLimitConfig(weight_bits=4, act_bits=8, method="rtn", transforms=names, act_layout="shared")
    model.quantize_qlimit(calib(model_type), config)
    expected = logits(model, eval_batch(model_type))
    model.save_pretrained(tmp_path / "q")
    reloaded = auto_class(model_type).from_pretrained(tmp_path / "q")
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(logits(reloaded, eval_batch(model_type)), expected)


BEST = {t: ["os_plus", "hadamard_inputs"] for t in DENSE} | {t: ["smoothquant"] for t in MOE}


@pytest.mark.parametrize("model_type", list(BEST))
def test_w4a4_rtn_with_the_transforms_is_not_worse(model_type):
    """W4 g32 A4 RTN (attention matmuls unquantized, so the Linear inputs are what differs) with outlier channels:
    relative logit error against FP with the transforms <= 1.1x without. Measured (seed 0), with / without OS+ and
    hadamard_inputs: qwen3 0.50 / 0.55, granite 0.51 / 0.70, gemma 0.52 / 0.65, gemma2 0.61 / 0.84, gemma3_text
    0.64 / 0.88, phi 0.21 / 0.32, phi3 0.34 / 0.72, gpt_neox 0.23 / 0.32, falcon 0.18 / 0.41, olmo2 0.96 / 1.06,
    gpt2 0.19 / 0.42; with / without SmoothQuant: qwen3_moe 0.45 / 0.48, mixtral 0.481 / 0.479 (flat)."""
    errors = {}
    for names in ([], BEST[model_type]):
        model = _outliers(build(model_type))
        fp = logits(model, eval_batch(model_type))
        config = QLimitConfig(
            weight_bits=4, act_bits=4, group_size=32, method="rtn", quantize_attention=False, transforms=names
        )
        model.quantize_qlimit(calib(model_type, n=16), config)
        errors["+".join(names) or "none"] = relative_logit_error(logits(model, eval_batch(model_type)), fp)
    with_transforms, without = errors["+".join(BEST[model_type])], errors["none"]
    assert with_transforms <= 1.1 * without, errors
