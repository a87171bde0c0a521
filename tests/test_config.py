"""QLimitConfig: the preset table, the method it resolves, validation when a config is built, checkpoints' dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.make_legacy_checkpoints import CASES, llama
from helpers import tiny_bert, tiny_decoder, tiny_opt
from transformers.quantizers.auto import AutoQuantizationConfig

from hf_qlimit import QLimitConfig
from hf_qlimit.presets import PRESETS, preset_values

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
# What each legacy checkpoint was built from (before method "auto"): causal LM?, the QLimitConfig arguments.
LEGACY_KWARGS = {name: (build is llama, kwargs) for name, (build, kwargs) in CASES.items()}


# fields added after the legacy checkpoints were written: an old config loads with their defaults
ADDED_SINCE = {"weight_format": None}


def _saved_config(name: str) -> dict:
    saved = json.loads((LEGACY / name / "config.json").read_text())["quantization_config"]
    assert not ADDED_SINCE.keys() & saved.keys()
    return {**saved, **ADDED_SINCE}


def test_round_trip_is_exact():
    config = QLimitConfig(
        weight_bits=2,
        act_bits=None,
        method="brecq",
        group_size=64,
        module_bits={"*.fc1": 8},
        modules_to_not_convert=["lm_head"],
        preset="paper",
        loss="fisher",
        beta_range=(16, 4),
    )
    for data in (config.to_dict(), config.resolved(causal_lm=True).to_dict()):
        again = QLimitConfig.from_dict(data)
        assert again.to_dict() == data
        assert AutoQuantizationConfig.from_dict(data).to_dict() == data  # the path from_pretrained takes
        assert json.loads(json.dumps(data)) == data
    assert dict(config.resolved(causal_lm=True)) == config.resolved(causal_lm=True).to_dict()  # fields only


def test_presets_fill_unset_fields_only_when_resolved():
    paper = QLimitConfig(preset="paper")
    assert paper.iters is None and paper.drop_prob is None and paper.method == "auto"  # the model is not known yet
    paper = paper.resolved(causal_lm=False)
    assert (paper.num_samples, paper.batch_size, paper.iters) == (1024, 32, 20000)
    assert paper.round_loss_weight == 0.01 and paper.beta_range == (20.0, 2.0) and paper.warmup == 0.2
    assert paper.drop_prob == 0.5 and paper.act_lr == 4e-5 and paper.weight_lr == 1e-3
    fast = QLimitConfig(preset="fast", iters=7).resolved(causal_lm=False)
    assert fast.iters == 7 and fast.num_samples == 256  # a field set by hand wins
    assert QLimitConfig(preset="paper", rounding="progressive").resolved(causal_lm=False).rounding == "progressive"


@pytest.mark.parametrize("preset, causal_lm", [("fast", False), ("fast-lm", True)])
@pytest.mark.parametrize("kwargs", [{}, {"act_bits": None, "weight_bits": 2}, {"method": "qdrop"}, {"method": "rtn"}])
def test_named_preset_and_auto_give_the_same_fields(preset, causal_lm, kwargs):
    named, auto = QLimitConfig(preset=preset, **kwargs), QLimitConfig(**kwargs)
    assert {**named.to_dict(), "preset": "auto"} == auto.to_dict()
    named, auto = named.resolved(causal_lm), auto.resolved(causal_lm)
    assert {**named.to_dict(), "preset": "auto"} == auto.to_dict()


# (preset, weight_bits, act_bits, method) -> (method, drop_prob, batch_size, weight_init) after resolution
TABLE = [
    (("fast", 4, 8, "auto"), ("brecq", 0.0, 32, "gptq")),
    (("fast", 2, None, "auto"), ("brecq", 0.0, 32, "gptq")),
    (("fast", 4, 4, "qdrop"), ("qdrop", 0.5, 32, "gptq")),  # an explicit qdrop drops, under every preset
    (("fast", 4, 8, "rtn"), ("rtn", 0.0, 32, "rtn")),  # plain round-to-nearest, not GPTQ's codes
    (("fast", 4, 8, "adaround"), ("adaround", 0.0, 32, "gptq")),
    (("fast-lm", 4, None, "auto"), ("brecq", 0.0, 4, "rtn")),
    (("fast-lm", 3, None, "auto"), ("brecq", 0.0, 4, "rtn")),
    (("fast-lm", 2, None, "auto"), ("brecq", 0.0, 8, "rtn")),  # AutoRound's batch at 2 bits
    (("fast-lm", 4, 8, "auto"), ("qdrop", 0.5, 4, "rtn")),
    (("fast-lm", 2, 8, "auto"), ("qdrop", 0.5, 8, "rtn")),
    (("fast-lm", 4, None, "qdrop"), ("qdrop", 0.5, 4, "rtn")),
    (("fast-lm", 4, 8, "brecq"), ("brecq", 0.0, 4, "rtn")),
    (("paper", 4, 8, "auto"), ("qdrop", 0.5, 32, "rtn")),
    (("paper", 2, None, "auto"), ("qdrop", 0.5, 32, "rtn")),
    (("paper", 4, 8, "brecq"), ("brecq", 0.0, 32, "rtn")),
]


@pytest.mark.parametrize("given, expected", TABLE, ids=["-".join(map(str, given)) for given, _ in TABLE])
def test_the_preset_table_resolves_method_drop_and_batch(given, expected):
    preset, weight_bits, act_bits, method = given
    config = QLimitConfig(preset=preset, weight_bits=weight_bits, act_bits=act_bits, method=method)
    resolved = config.resolved(causal_lm=preset == "fast-lm")
    assert (resolved.method, resolved.drop_prob, resolved.batch_size, resolved.weight_init) == expected
    assert resolved.drop_probability == expected[1]
    values = preset_values(preset, weight_bits, act_bits, method)
    assert (values["method"], values["drop_prob"], values["batch_size"], values["weight_init"]) == expected


@pytest.mark.parametrize(
    "kwargs, method, drop",
    [
        ({"drop_prob": 0.5}, "qdrop", 0.5),  # with method "auto", a drop_prob asks for QDrop...
        ({"drop_prob": 0.25, "preset": "paper"}, "qdrop", 0.25),
        ({"drop_prob": 0.0, "preset": "paper"}, "brecq", 0.0),  # ...or rules it out
        ({"method": "qdrop", "drop_prob": 0.0}, "qdrop", 0.0),  # old checkpoints' "default": runs as BRECQ
        ({"method": "brecq", "drop_prob": 0.5}, "brecq", 0.0),  # brecq never drops
    ],
)
def test_drop_prob_set_by_hand(kwargs, method, drop):
    resolved = QLimitConfig(**kwargs).resolved(causal_lm=False)
    assert resolved.method == method and resolved.drop_probability == drop


def test_qdrop_drops_before_resolution_too():
    assert QLimitConfig(method="qdrop").drop_probability == 0.5
    assert QLimitConfig(method="qdrop", drop_prob=0.1).drop_probability == 0.1
    assert QLimitConfig().drop_probability == 0.0 and QLimitConfig(method="brecq").drop_probability == 0.0


@pytest.mark.parametrize("name", sorted(LEGACY_KWARGS))
def test_old_checkpoints_load_and_today_resolves_to_what_they_ran(name):
    saved = _saved_config(name)
    loaded = QLimitConfig.from_dict(saved)
    assert loaded.to_dict() == saved
    causal_lm, kwargs = LEGACY_KWARGS[name]
    assert loaded.resolved(causal_lm).to_dict() == saved  # a checkpoint's config is resolved already
    today = QLimitConfig(**kwargs).resolved(causal_lm).to_dict()
    today["layer_config"] = saved["layer_config"]
    today["transforms"] = today["transforms"] or None  # [] and None both mean no transforms
    if saved["method"] == "qdrop" and saved["drop_prob"] == 0.0:  # the old default: QDrop at drop 0 is BRECQ
        assert today["method"] == "brecq"
        today["method"] = "qdrop"
    assert today == saved


def test_summary_names_what_runs_and_the_presets_choices():
    assert "for_model" in QLimitConfig().summary()  # not resolved: says so
    encoder = QLimitConfig(act_bits=4).resolved(causal_lm=False).summary()
    assert encoder.startswith("BRECQ W4A4, preset fast (auto): 256 samples, batch 32, 200 iterations per block")
    assert "method 'brecq' (" in encoder and "weight_init 'gptq'" in encoder and "rounding 'progressive'" in encoder
    decoder = QLimitConfig(weight_bits=2, act_bits=None, group_size=64).resolved(causal_lm=True).summary()
    assert decoder.startswith("BRECQ W2 weight-only g64, preset fast-lm (auto)")
    assert "batch_size 8 (AutoRound's batch at 2-bit weights)" in decoder
    assert "(weight-only: no activations to drop)" in decoder
    qdrop = QLimitConfig(method="qdrop").resolved(causal_lm=False).summary()
    assert qdrop.startswith("QDrop (drop_prob 0.5) W4A8") and "drop_prob 0.5 (QDrop's probability)" in qdrop
    assert "i.e. BRECQ" in QLimitConfig(method="qdrop", drop_prob=0.0).resolved(causal_lm=False).summary()
    rtn = QLimitConfig(method="rtn").resolved(causal_lm=False).summary()
    assert "iterations" not in rtn and "rounding" not in rtn and "weight_init 'rtn'" in rtn
    assert QLimitConfig(method="rtn", weight_init="gptq").resolved(causal_lm=False).summary().startswith("GPTQ")
    adaround = QLimitConfig(method="adaround").resolved(causal_lm=True).summary()  # fast-lm's rounding: sign
    assert adaround.startswith("AdaRound (Linear by Linear, sign rounding, not AdaRound's annealed update) W4A8")
    annealed = QLimitConfig(method="adaround", rounding="anneal").resolved(causal_lm=True).summary()
    assert annealed.startswith("AdaRound W4A8")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"act_bits": 0}, "act_bits"),
        ({"first_last_bits": 16}, "first_last_bits"),
        ({"group_size": 0}, "group_size"),
        ({"weight_sym": "no"}, "weight_sym"),
        ({"act_sym": 1}, "act_sym"),
        ({"quantize_attention": "yes"}, "quantize_attention"),
        ({"lp_norm": 0}, "lp_norm"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
        ({"module_bits": {"fc1": 12}}, "module_bits"),
        ({"module_bits": {"": 4}}, "module_bits"),
        ({"module_bits": {3: 4}}, "module_bits"),
        ({"method": "gptq"}, "method"),
        ({"preset": "slow"}, "preset"),
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"iters": -1}, "iters"),
        ({"max_length": 0}, "max_length"),
        ({"seed": 1.5}, "seed"),
        ({"drop_prob": 1.5}, "drop_prob"),
        ({"loss": "kl"}, "loss"),
        ({"fisher_damping": -1.0}, "fisher_damping"),
        ({"rounding": "sometimes"}, "rounding"),
        ({"weight_init": "awq"}, "weight_init"),
        ({"weight_range": "mse"}, "weight_range"),
        ({"gptq_act_order": "yes"}, "gptq_act_order"),
        ({"init_margin": 0.5}, "init_margin"),
        ({"learn_weight_scale": 1}, "learn_weight_scale"),
        ({"weight_lr": -1e-3}, "weight_lr"),
        ({"act_lr": "fast"}, "act_lr"),
        ({"scale_lr": -1.0}, "scale_lr"),
        ({"round_loss_weight": -0.01}, "round_loss_weight"),
        ({"beta_range": (20.0,)}, "beta_range"),
        ({"beta_range": (20.0, 0.0)}, "beta_range"),
        ({"warmup": 1.0}, "warmup"),
        ({"batch_sampling": "shuffled"}, "batch_sampling"),
        ({"bit_candidates": []}, "bit_candidates"),
        ({"bit_candidates": [2, 16], "avg_bits": 4}, "bit_candidates"),
        ({"bit_candidates": [2, 4]}, "avg_bits"),  # a budget is needed
        ({"avg_bits": -3.0}, "avg_bits"),
        ({"size_budget_bytes": 0}, "size_budget_bytes"),
        ({"bops_budget": 0}, "bops_budget"),
        ({"sensitivity_cache": 3}, "sensitivity_cache"),
        ({"sensitivity_cache": ""}, "sensitivity_cache"),
        ({"transforms": "hadamard_inputs"}, "transforms"),  # a name, not a list of them
        ({"transforms": ["rotate_everything"]}, "transforms"),
        ({"transforms": ["hadamard_down@0.5"]}, "transforms"),
        ({"transforms": ["smoothquant@2"]}, "transforms"),
        ({"transforms": ["smoothquant", "os_plus"]}, "transforms"),
        ({"act_layout": "tied"}, "act_layout"),
        ({"prob_bits": 9}, "prob_bits"),
        ({"prob_grid": "log10"}, "prob_grid"),
        ({"act_dynamic": "per_token"}, "act_dynamic"),
        ({"act_fp_first_token": 1}, "act_fp_first_token"),
    ],
)
def test_invalid_values_name_the_field_when_built(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        QLimitConfig(**kwargs)


def test_valid_values_pass():
    QLimitConfig(
        transforms=("smoothquant@0.75", "hadamard_inputs"),
        act_layout="block_output",
        prob_bits=4,
        prob_grid="log2",
        act_dynamic=True,
        act_fp_first_token=True,
        bit_candidates=[8, 2, 4],
        avg_bits=3,
        bops_budget=1e9,
        sensitivity_cache="cache/sens.json",
        init_margin=0.05,
        iters=0,
        seed=-1,
    )


def test_building_a_config_does_not_look_at_the_local_files(tmp_path):
    """A checkpoint's config is rebuilt on every load, wherever: a sensitivity_cache naming a folder there is no
    error (quantization refuses it: tests/test_mixed_precision.py)."""
    config = QLimitConfig(bit_candidates=[2, 4], avg_bits=3, sensitivity_cache=str(tmp_path))
    assert QLimitConfig.from_dict(config.to_dict()).sensitivity_cache == str(tmp_path)


def test_foreign_config_is_rejected():
    with pytest.raises(ValueError, match="Unknown QLimitConfig fields"):
        QLimitConfig.from_dict({"quant_method": "qlimit", "bits": 4})


@pytest.mark.parametrize("kind", ["llama", "opt", "bert"])
def test_the_default_config_resolves_per_family_as_the_docs_say(kind):
    model = {"llama": lambda: tiny_decoder("llama"), "opt": tiny_opt, "bert": tiny_bert}[kind]()
    resolved = QLimitConfig(weight_bits=3, group_size=16, act_bits=4).for_model(model)
    preset = "fast" if kind == "bert" else "fast-lm"
    for key, value in preset_values(preset, 3, 4, causal_lm=kind != "bert").items():
        assert getattr(resolved, key) == value, key
    assert resolved.weight_bits == 3 and resolved.group_size == 16 and resolved.preset == "auto"
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    p = PRESETS[preset]
    words = f"{p['num_samples']} samples, batch {p['batch_size']}, {p['iters']}"
    assert f'`"{preset}"` for ' in docs and words in docs, words


def test_summary_names_every_choice_set_otherwise_than_the_defaults():
    summary = QLimitConfig(prob_grid="log2", act_fp_first_token=True, seed=3).resolved(causal_lm=True).summary()
    assert summary.endswith("; set otherwise than the defaults: seed=3, prob_grid='log2', act_fp_first_token=True")
    # what the preset filled is named under the preset's choices, not again; the defaults add nothing
    assert "set otherwise" not in QLimitConfig().resolved(causal_lm=False).summary()
    assert QLimitConfig(drop_prob=0.25).resolved(causal_lm=False).summary().endswith("defaults: drop_prob=0.25")
