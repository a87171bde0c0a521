import pytest

from hf_qlimit import QLimitConfig
from transformers.quantizers.auto import AutoQuantizationConfig


def test_round_trip_is_exact():
    config = QLimitConfig(weight_bits=2, act_bits=None, method="brecq", group_size=64, module_bits={"*.fc1": 8},
                          modules_to_not_convert=["lm_head"], preset="paper", loss="fisher", beta_range=(16, 4))  # fmt: skip
    data = config.to_dict()
    again = QLimitConfig.from_dict(data)
    assert again.to_dict() == data
    assert AutoQuantizationConfig.from_dict(data).to_dict() == data  # the path from_pretrained takes


def test_presets_fill_only_unset_fields():
    paper = QLimitConfig(preset="paper")
    assert (paper.num_samples, paper.batch_size, paper.iters) == (1024, 32, 20000)
    fast = QLimitConfig(preset="fast", iters=7)
    assert fast.iters == 7 and fast.num_samples == QLimitConfig(preset="fast").num_samples
    assert paper.round_loss_weight == 0.01 and paper.beta_range == (20.0, 2.0) and paper.warmup == 0.2
    assert paper.drop_prob == 0.5 and paper.act_lr == 4e-5 and paper.weight_lr == 1e-3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": 0}, "act_bits"),
        ({"method": "gptq"}, "method"),
        ({"loss": "kl"}, "loss"),
        ({"preset": "slow"}, "preset"),
        ({"group_size": 0}, "group_size"),
        ({"drop_prob": 1.5}, "drop_prob"),
        ({"module_bits": {"fc1": 12}}, "module_bits"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QLimitConfig(**kwargs)


def test_foreign_config_is_rejected():
    with pytest.raises(ValueError, match="Unknown QLimitConfig fields"):
        QLimitConfig.from_dict({"quant_method": "qlimit", "bits": 4})


@pytest.mark.parametrize("kind", ["llama", "opt", "bert"])
def test_the_default_config_resolves_per_family_as_the_readme_says(kind):
    from pathlib import Path

    from helpers import tiny_bert, tiny_opt
    from helpers import tiny_decoder as tiny

    from hf_qlimit.config import PRESETS

    model = {"llama": lambda: tiny("llama"), "opt": tiny_opt, "bert": tiny_bert}[kind]()
    resolved = QLimitConfig(weight_bits=3, group_size=16, act_bits=None).for_model(model)
    preset = "fast" if kind == "bert" else "fast-lm"
    for key, value in PRESETS[preset].items():
        assert getattr(resolved, key) == value, key
    if preset == "fast":  # BRECQ's inputs at short budgets, as measured
        assert resolved.drop_probability == 0.0
        assert QLimitConfig(weight_bits=4, act_bits=4).for_model(model).drop_probability == 0.0
        assert QLimitConfig(weight_bits=2, act_bits=8).for_model(model).drop_probability == 0.0
        assert QLimitConfig(weight_bits=4, act_bits=4, drop_prob=0.5).for_model(model).drop_probability == 0.5
        assert QLimitConfig(weight_bits=4, act_bits=4, preset="paper").drop_probability == 0.5
    assert resolved.method == "qdrop" and resolved.weight_bits == 3 and resolved.group_size == 16
    if preset == "fast-lm":  # the decoder default: signed steps from round-to-nearest on the min-max grid
        assert (resolved.weight_init, resolved.weight_range, resolved.rounding) == ("rtn", "minmax", "sign")
        assert resolved.drop_probability == 0.0  # weight-only: the blocks train on the quantized stream alone
        with_acts = QLimitConfig(weight_bits=4, act_bits=8).for_model(model)
        assert with_acts.drop_probability == 0.5  # QDrop's dropping stays where activations are quantized
        two_bits = QLimitConfig(weight_bits=2, group_size=16, act_bits=None)
        assert two_bits.for_model(model).batch_size == 8  # AutoRound's batch at 2 bits, as the README says
        assert QLimitConfig(weight_bits=2, preset="fast-lm").batch_size == 8
        assert QLimitConfig(weight_bits=2, batch_size=2).for_model(model).batch_size == 2  # a set field wins
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    p = PRESETS[preset]
    words = f"{p['num_samples']} samples, batch {p['batch_size']}, {p['iters']}"
    assert f'`"{preset}"` for ' in readme and words in readme, words
    paper = QLimitConfig(preset="paper").for_model(model)  # the papers' setting stays reachable as it was
    assert (paper.weight_init, paper.weight_range, paper.gptq_act_order) == ("rtn", "lp", False)
