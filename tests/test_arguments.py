"""hf_qlimit.cli.arguments: the example scripts' flags, mapped onto QLimitConfig."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from transformers import HfArgumentParser

from hf_qlimit import QLimitConfig
from hf_qlimit.cli.arguments import QuantizationArguments, parse_arguments, parse_bits, parse_module_bits
from hf_qlimit.config_checks import (
    ACT_LAYOUTS,
    BATCH_SAMPLINGS,
    LOSSES,
    PROB_GRIDS,
    ROUNDINGS,
    WEIGHT_INITS,
    WEIGHT_RANGES,
)
from hf_qlimit.presets import METHODS, PRESETS

# Flags with another name (or unit) than their QLimitConfig field, and the quantize_qlimit arguments.
RENAMED = {"quant_seed": "seed", "size_budget_mb": "size_budget_bytes", "no_quantize_attention": "quantize_attention"}
NOT_CONFIG = {"work_dir", "resume", "cache_budget_mb"}
# QLimitConfig fields without a flag, and why.
NOT_FLAGS = {
    "max_length": "an argument of to_config: the example's own sequence length",
    "layer_config": "filled by quantization",
    "quant_method": "always 'qlimit'",
}


def _parse(*argv: str) -> QuantizationArguments:
    (args,) = HfArgumentParser(QuantizationArguments).parse_args_into_dataclasses(args=list(argv))
    return args


def test_no_flags_give_the_default_config():
    assert QuantizationArguments().method == "auto"
    assert _parse().to_config(seed=3).to_dict() == QLimitConfig(seed=3).to_dict()
    assert _parse().to_config(seed=3, max_length=128).max_length == 128


def test_every_config_field_has_a_flag_or_says_why_not():
    flags = {RENAMED.get(f.name, f.name) for f in dataclasses.fields(QuantizationArguments)}
    missing = [f.name for f in dataclasses.fields(QLimitConfig) if f.name not in flags | set(NOT_FLAGS)]
    assert not missing, f"QLimitConfig fields with no flag in QuantizationArguments and not in NOT_FLAGS: {missing}"
    assert not flags & set(NOT_FLAGS), "a field in NOT_FLAGS has a flag now"


def test_every_flag_reaches_its_config_field():
    fields = {f.name for f in dataclasses.fields(QLimitConfig)}
    for flag in dataclasses.fields(QuantizationArguments):
        assert flag.name in NOT_CONFIG or RENAMED.get(flag.name, flag.name) in fields, flag.name
        assert flag.metadata.get("help"), flag.name
    args = _parse(
        "--method",
        "qdrop",
        "--preset",
        "paper",
        "--weight_bits",
        "3",
        "--act_bits",
        "none",
        "--drop_prob",
        "0.25",
        "--group_size",
        "64",
        "--num_samples",
        "16",
        "--iters",
        "5",
        "--batch_size",
        "4",
        "--loss",
        "fisher",
        "--rounding",
        "sign",
        "--learn_weight_scale",
        "false",
        "--weight_init",
        "gptq",
        "--weight_range",
        "minmax",
        "--gptq_act_order",
        "true",
        "--weight_lr",
        "0.1",
        "--act_lr",
        "0.2",
        "--scale_lr",
        "0.3",
        "--fisher_damping",
        "0.5",
        "--batch_sampling",
        "random",
        "--first_last_bits",
        "fp",
        "--modules_to_not_convert",
        "lm_head",
        "classifier",
        "--quant_seed",
        "7",
        "--bit_candidates",
        "2",
        "4",
        "--avg_bits",
        "3",
        "--size_budget_mb",
        "1.5",
        "--sensitivity_cache",
        "sens.json",
        "--transforms",
        "smoothquant@0.75",
        "--act_layout",
        "shared",
        "--prob_bits",
        "6",
        "--prob_grid",
        "log2",
        "--act_dynamic",
        "true",
        "--act_fp_first_token",
        "--weight_sym",
        "--act_sym",
        "--no_quantize_attention",
        "--lp_norm",
        "3.0",
        "--init_margin",
        "0.1",
        "--round_loss_weight",
        "0.02",
        "--beta_range",
        "10",
        "1",
        "--warmup",
        "0.3",
        "--bops_budget",
        "1e9",
        "--module_bits",
        "*.fc1=8",
        "lm_head=6",
    )
    config = args.to_config(seed=0)
    expected = {
        "method": "qdrop",
        "preset": "paper",
        "weight_bits": 3,
        "act_bits": None,
        "drop_prob": 0.25,
        "group_size": 64,
        "num_samples": 16,
        "iters": 5,
        "batch_size": 4,
        "loss": "fisher",
        "rounding": "sign",
        "learn_weight_scale": False,
        "weight_init": "gptq",
        "weight_range": "minmax",
        "gptq_act_order": True,
        "weight_lr": 0.1,
        "act_lr": 0.2,
        "scale_lr": 0.3,
        "fisher_damping": 0.5,
        "batch_sampling": "random",
        "first_last_bits": None,
        "modules_to_not_convert": ["lm_head", "classifier"],
        "seed": 7,
        "bit_candidates": [2, 4],
        "avg_bits": 3.0,
        "size_budget_bytes": 1_500_000,
        "sensitivity_cache": "sens.json",
        "transforms": ["smoothquant@0.75"],
        "act_layout": "shared",
        "prob_bits": 6,
        "prob_grid": "log2",
        "act_dynamic": True,
        "act_fp_first_token": True,
        "weight_sym": True,
        "act_sym": True,
        "quantize_attention": False,
        "lp_norm": 3.0,
        "init_margin": 0.1,
        "round_loss_weight": 0.02,
        "beta_range": (10.0, 1.0),
        "warmup": 0.3,
        "bops_budget": 1e9,
        "module_bits": {"*.fc1": 8, "lm_head": 6},
    }
    # weight_format sets the grid fields above itself: its own test below
    assert set(expected) == {f.name for f in dataclasses.fields(QLimitConfig)} - set(NOT_FLAGS) - {"weight_format"}
    defaults = QLimitConfig()
    assert all(expected[key] != getattr(defaults, key) for key in expected), "each value must differ from the default"
    assert {key: getattr(config, key) for key in expected} == expected
    assert args.quantize_kwargs() == {"work_dir": None, "resume": False, "cache_budget_bytes": None}


def test_weight_format_flag_sets_the_grid_and_refuses_a_contradiction():
    (args,) = HfArgumentParser(QuantizationArguments).parse_args_into_dataclasses(["--weight_format", "gguf:q4_0"])
    config = args.to_config(seed=0)
    assert (config.weight_format, config.weight_bits, config.group_size, config.weight_sym) == (
        "gguf:q4_0",
        4,
        32,
        True,
    )
    assert config.act_bits is None  # GGUF holds weights only: the default 8 is dropped
    with pytest.raises(ValueError, match="weight_format='gguf:q4_1' contradicts weight_sym=True"):
        HfArgumentParser(QuantizationArguments).parse_args_into_dataclasses(
            ["--weight_format", "gguf:q4_1", "--weight_sym"]
        )


@pytest.mark.parametrize(
    "method, resolved_method, drop", [("auto", "brecq", 0.0), ("qdrop", "qdrop", 0.5), ("brecq", "brecq", 0.0)]
)
def test_method_flag_resolves_as_the_config(method, resolved_method, drop):
    config = _parse("--method", method).to_config(seed=0).resolved(causal_lm=False)
    assert config.method == resolved_method and config.drop_probability == drop


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--method", "gptq"], "method"),
        (["--preset", "slow"], "preset"),
        (["--loss", "kl"], "loss"),
        (["--rounding", "sometimes"], "rounding"),
        (["--act_layout", "tied"], "act_layout"),
        (["--prob_grid", "log10"], "prob_grid"),
        (["--transforms", "rotate"], "transforms"),
    ],
)
def test_impossible_flags_fail_at_parsing_naming_the_flag(argv, field):
    with pytest.raises(ValueError, match=f"`{field}` must be|`{field}`:"):
        _parse(*argv)


@pytest.mark.parametrize(
    "flag, allowed",
    [
        ("method", METHODS),
        ("preset", tuple(PRESETS)),
        ("loss", LOSSES),
        ("rounding", ROUNDINGS),
        ("weight_init", WEIGHT_INITS),
        ("weight_range", WEIGHT_RANGES),
        ("batch_sampling", BATCH_SAMPLINGS),
        ("act_layout", ACT_LAYOUTS),
        ("prob_grid", PROB_GRIDS),
    ],
)
def test_help_names_every_allowed_value(flag, allowed):
    """The help texts are built from the config's lists; a value missing from one is a help text written by hand."""
    (text,) = [f.metadata["help"] for f in dataclasses.fields(QuantizationArguments) if f.name == flag]
    missing = [v for v in allowed if not re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", text)]
    assert not missing, f"--{flag}'s help does not name {missing}: {text!r}"


def test_help_lists_the_allowed_values():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(QuantizationArguments)}
    assert helps["method"].startswith("auto, rtn, adaround, brecq or qdrop.")
    assert helps["preset"].startswith("auto, paper, fast or fast-lm:")
    assert "mse or fisher" in helps["loss"] and "unit (fixed to [0, 1]: never clips" in helps["prob_grid"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "gptq"}, "`method`"),  # a .json file skips argparse's choices
        ({"transforms": ["rotate"]}, "`transforms`"),
        ({"weight_bits": 12}, "`weight_bits`"),
        ({"act_bits": "twelve"}, "--act_bits"),
        ({"drop_prob": 2.0}, "`drop_prob`"),
        ({"bit_candidates": [2, 4]}, "avg_bits"),
    ],
)
def test_impossible_values_fail_when_the_arguments_are_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationArguments(**kwargs)


def test_a_json_file_is_checked_too(tmp_path, monkeypatch):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"method": "qdrop", "act_bits": "none", "module_bits": {"*.fc1": 8}}))
    monkeypatch.setattr("sys.argv", ["run.py", str(path)])
    (args,) = parse_arguments(HfArgumentParser(QuantizationArguments))
    config = args.to_config(seed=0)
    assert config.act_bits is None and args.method == "qdrop" and config.module_bits == {"*.fc1": 8}
    path.write_text(json.dumps({"method": "qdorp"}))
    with pytest.raises(ValueError, match="`method`"):
        parse_arguments(HfArgumentParser(QuantizationArguments))


@pytest.mark.parametrize("value, bits", [(None, None), (4, 4), ("8", 8), ("none", None), ("FP", None), ("", None)])
def test_parse_bits(value, bits):
    assert parse_bits("act_bits", value) == bits


def test_parse_bits_names_the_flag():
    with pytest.raises(ValueError, match="--first_last_bits"):
        parse_bits("first_last_bits", "eight")


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, {}),
        (["*.fc1=8", "lm_head=6"], {"*.fc1": 8, "lm_head": 6}),
        (['{"*.fc1": 8, "lm_head": 6}'], {"*.fc1": 8, "lm_head": 6}),
        (['{"a": 4}', "b=3"], {"a": 4, "b": 3}),
        ("a.b=5", {"a.b": 5}),
        ({"a": 4}, {"a": 4}),  # from a .json file
    ],
)
def test_parse_module_bits(value, expected):
    assert parse_module_bits(value) == expected


@pytest.mark.parametrize("value", [["fc1"], ["fc1=eight"], ["=8"], ["{not json"]])
def test_parse_module_bits_names_the_flag(value):
    with pytest.raises(ValueError, match="--module_bits"):
        parse_module_bits(value)


@pytest.mark.parametrize(
    "argv, field",
    [(["--module_bits", "fc1=12"], r"module_bits\['fc1'\]"), (["--beta_range", "20"], "beta_range")],
)
def test_new_flags_are_checked_by_the_config(argv, field):
    with pytest.raises(ValueError, match=field):
        _parse(*argv)


def test_quantize_attention_is_a_bool_flag():
    unset = _parse().to_config(seed=0)
    assert unset.quantize_attention is None  # the preset's: encoders quantize the matmuls, decoder LMs not
    assert unset.resolved(causal_lm=False).quantize_attention is True
    assert unset.resolved(causal_lm=True).quantize_attention is False
    assert _parse("--no_quantize_attention").to_config(seed=0).quantize_attention is False
    assert _parse("--quantize_attention", "false").to_config(seed=0).quantize_attention is False
    assert _parse("--quantize_attention", "true").to_config(seed=0).resolved(causal_lm=True).quantize_attention
    with pytest.raises(ValueError, match="contradict"):
        _parse("--no_quantize_attention", "--quantize_attention", "true")


def test_prob_grid_flag_takes_the_unit_grid():
    config = _parse("--prob_grid", "unit", "--prob_bits", "8").to_config(seed=0)
    assert (config.prob_grid, config.prob_bits) == ("unit", 8)
    # unset: the preset's, "uniform" for encoders ("unit" measured worse there) and "unit" for decoder LMs
    assert _parse().to_config(seed=0).prob_grid is None
    assert _parse().to_config(seed=0).resolved(causal_lm=False).prob_grid == "uniform"
    assert _parse().to_config(seed=0).resolved(causal_lm=True).prob_grid == "unit"


def test_transforms_none_turns_the_default_rotations_off():
    config = _parse("--act_bits", "4", "--transforms", "none").to_config(seed=0)
    assert config.transforms == [] and config.resolved(causal_lm=False).transforms == []
    assert _parse("--act_bits", "4").to_config(seed=0).resolved(causal_lm=False).transforms == ["hadamard_inputs"]
