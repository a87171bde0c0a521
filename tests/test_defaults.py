"""What `QLimitConfig(weight_bits=..., act_bits=...)` resolves to by activation width and model kind (issue 32),
and that the defaults run on every family of the model zoo, leaving the rotations out (and saying so) where the
architecture cannot take them."""

from __future__ import annotations

import model_zoo as zoo
import pytest
import torch

from hf_qlimit import QLimitConfig
from hf_qlimit.transforms import InputTransform

PAPERS = {"quantize_attention": True, "act_dynamic": False, "act_layout": "per_linear", "prob_grid": "uniform"}


def _activations(config: QLimitConfig) -> dict:
    return {k: getattr(config, k) for k in (*PAPERS, "transforms")}


@pytest.mark.parametrize(
    ("causal_lm", "act_bits", "expected"),
    [
        (False, 8, {**PAPERS, "transforms": None}),
        (False, 4, {**PAPERS, "act_layout": "shared", "transforms": ["hadamard_inputs"]}),
        (
            True,
            8,
            {
                "quantize_attention": False,
                "act_dynamic": True,
                "act_layout": "per_linear",
                "prob_grid": "unit",
                "transforms": ["hadamard_down"],
            },
        ),
        (
            True,
            4,
            {
                "quantize_attention": False,
                "act_dynamic": True,
                "act_layout": "shared",
                "prob_grid": "unit",
                "transforms": ["hadamard_inputs"],
            },
        ),
        (True, None, {**PAPERS, "transforms": None}),  # weight-only: no activation choice applies
    ],
)
def test_the_defaults_by_activation_width_and_model_kind(causal_lm, act_bits, expected):
    assert _activations(QLimitConfig(act_bits=act_bits).resolved(causal_lm)) == expected


def test_two_bit_weights_rotate_an_encoders_inputs_only():
    w2a8 = QLimitConfig(weight_bits=2, act_bits=8)
    assert _activations(w2a8.resolved(causal_lm=False)) == {**PAPERS, "transforms": ["hadamard_inputs"]}
    assert "2-bit weights on an encoder" in w2a8.resolved(causal_lm=False).summary()
    assert w2a8.resolved(causal_lm=True).transforms == ["hadamard_down"]  # the decoder rule, as at 4-bit weights
    assert QLimitConfig(weight_bits=2, act_bits=None).resolved(causal_lm=False).transforms is None
    assert QLimitConfig(weight_bits=3, act_bits=8).resolved(causal_lm=False).transforms is None
    assert QLimitConfig(weight_bits=2, act_bits=8, preset="paper").resolved(causal_lm=False).transforms is None


@pytest.mark.parametrize("causal_lm", [False, True])
def test_the_paper_preset_keeps_the_papers_activations_and_set_fields_win(causal_lm):
    paper = QLimitConfig(act_bits=4, preset="paper").resolved(causal_lm)
    assert _activations(paper) == {**PAPERS, "transforms": None}
    mine = dict(quantize_attention=True, act_dynamic=False, act_layout="per_linear", prob_grid="log2", transforms=[])
    assert _activations(QLimitConfig(act_bits=4, **mine).resolved(causal_lm)) == mine


def test_the_summary_names_the_activation_choices():
    summary = QLimitConfig(act_bits=8).resolved(causal_lm=True).summary()
    assert "quantize_attention False" in summary and "act_dynamic True" in summary
    assert "transforms ['hadamard_down']" in summary
    assert "prob_grid" not in summary  # no probabilities are quantized, so their grid is not a choice
    assert "transforms" not in QLimitConfig(act_bits=8).resolved(causal_lm=False).summary()


def test_a_refused_rotation_is_left_out_and_said():
    config = QLimitConfig(act_bits=4).resolved(causal_lm=True, transform_refusal=lambda names: f"no {names[0]} here")
    assert config.transforms is None and config.act_layout == "shared"
    assert config.summary().endswith("; no rotations for this model: no hadamard_inputs here")
    # what the user set is not the table's: it is applied, or refused when quantizing
    mine = QLimitConfig(act_bits=4, transforms=["hadamard_inputs"]).resolved(True, lambda names: "never asked")
    assert mine.transforms == ["hadamard_inputs"] and "no rotations" not in mine.summary()


def _quantize_with_the_defaults(model_type: str, act_bits: int):
    model = zoo.build(model_type)
    extra = {"quantize_attention": False} if model_type in zoo.OWN_ATTENTION else {}
    config = QLimitConfig(weight_bits=4, act_bits=act_bits, method="rtn", num_samples=4, batch_size=4, **extra)
    resolved = config.for_model(model)
    model.quantize_qlimit(zoo.calib(model_type, n=4), config)
    return model, resolved


@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("model_type", zoo.MATRIX)
def test_the_defaults_run_on_every_family(model_type, act_bits):
    model, resolved = _quantize_with_the_defaults(model_type, act_bits)
    rotated = any(isinstance(m, InputTransform) and m.rotate for m in model.modules())
    assert rotated == bool(resolved.transforms), resolved.summary()
    if resolved.transforms is None and (act_bits == 4 or model_type in zoo.DECODERS):
        assert "no rotations for this model: " in resolved.summary()
    with torch.no_grad():
        assert torch.isfinite(zoo.logits(model, zoo.eval_batch(model_type))).all()
