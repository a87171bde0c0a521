"""The preset table: what every `QLimitConfig` field left unset (None, or `method="auto"`) resolves to.

A preset resolves once the model is known (`QLimitConfig.resolved` / `for_model`), whether it was named or
`"auto"`, so a config reads the same before quantization whichever way the preset was chosen. Resolution:

1. `"auto"` picks `"fast-lm"` for causal LMs and `"fast"` for the others;
2. the preset's base values, then its rules in order (a later rule overrides an earlier value);
3. the rules every preset shares (`COMMON_RULES`), which follow from the method;
4. every field the user set keeps its value: only unset fields take the table's.

Why the presets differ is in docs/design/short-budget-schedule.md; the measured tables in docs/results/.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"
METHODS = ("rtn", "adaround", "brecq", "qdrop")
QDROP_PROB = 0.5  # the papers' probability of keeping an activation in full precision


@dataclass(frozen=True)
class When:
    """A rule's condition; a condition left None matches anything."""

    max_weight_bits: int | None = None  # weight_bits <= this
    weight_only: bool | None = None  # act_bits is None
    max_act_bits: int | None = None  # act_bits is set and <= this
    causal_lm: bool | None = None  # the model is a decoder LM
    method: str | None = None  # the method as resolved so far (the user's, else the table's)

    def matches(self, weight_bits: int, act_bits: int | None, method: str, causal_lm: bool = False) -> bool:
        return (
            (self.max_weight_bits is None or weight_bits <= self.max_weight_bits)
            and (self.weight_only is None or self.weight_only == (act_bits is None))
            and (self.max_act_bits is None or (act_bits is not None and act_bits <= self.max_act_bits))
            and (self.causal_lm is None or self.causal_lm == causal_lm)
            and (self.method is None or self.method == method)
        )


@dataclass(frozen=True)
class Rule:
    """Where `when` holds, `values` replace the table's values so far; `why` is shown by `QLimitConfig.summary`."""

    when: When
    values: Mapping[str, Any]
    why: str


@dataclass(frozen=True)
class Preset(Mapping[str, Any]):
    """A preset's base values (read it as a dict of them), its rules, and why some base values are what they are
    (`notes`, shown by `QLimitConfig.summary`)."""

    values: Mapping[str, Any]
    rules: tuple[Rule, ...] = field(default=())
    notes: Mapping[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


# The same in every preset: the AdaRound regulariser and the MSE loss of the papers.
_COMMON = {
    "round_loss_weight": 0.01,
    "beta_range": (20.0, 2.0),
    "warmup": 0.2,
    "loss": "mse",
    "fisher_damping": 1.0,
    "drop_prob": 0.0,  # no dropping unless the method is QDrop (COMMON_RULES)
    # the activations as the papers quantize them: a calibrated grid per Linear input, probabilities included
    "quantize_attention": True,
    "act_layout": "per_linear",
    "prob_grid": "uniform",
    "act_dynamic": False,
}

# Beyond the papers, measured better on the activations (docs/results/glue.md, language-modeling.md); the
# rotations are left out where the architecture cannot take them (`QLimitConfig.resolved` says why). In order:
# the 4-bit rule's rotation of every Linear input includes the decoder rule's FFN down one.
_ACTIVATION_RULES = (
    Rule(
        When(weight_only=False, causal_lm=True),
        {"quantize_attention": False, "act_dynamic": True, "prob_grid": "unit", "transforms": ["hadamard_down"]},
        "decoder LM: Linear inputs per token with the FFN down input rotated, attention matmuls in FP "
        "(probabilities on [0, 1] if quantized)",
    ),
    Rule(
        When(max_act_bits=4),
        {"transforms": ["hadamard_inputs"], "act_layout": "shared"},
        "4-bit activations: rotated Linear inputs, one grid per tensor",
    ),
)

# Encoders at 2-bit weights: the rotation also spreads the weights' outliers over their rows, which a 2-bit grid
# per output channel needs most (MiniLM W2A8: glue.md, squad.md); the activation layout stays per Linear.
_W2_ENCODER_RULE = Rule(
    When(max_weight_bits=2, weight_only=False, causal_lm=False),
    {"transforms": ["hadamard_inputs"]},
    "2-bit weights on an encoder: rotated Linear inputs",
)

PRESETS: dict[str, Preset] = {
    # The papers' exact setting: 20k iterations of β-annealed rounding from the FP weight on the Lp grid, each
    # step's batch drawn at random from all the samples, QDrop's dropping.
    "paper": Preset(
        {
            **_COMMON, "method": "qdrop",
            "num_samples": 1024, "batch_size": 32, "iters": 20000, "batch_sampling": "random",
            "weight_init": "rtn", "weight_range": "lp", "gptq_act_order": False, "init_margin": None,
            "rounding": "anneal", "learn_weight_scale": False, "weight_lr": 1e-3, "act_lr": 4e-5, "scale_lr": 1e-3,
        },
    ),
    # Minutes on a CPU for encoders: 100x fewer iterations, so the rounding starts from GPTQ's codes, hardens in
    # rounds and learns the weight steps too, at higher learning rates; no activation dropping, which only pays
    # after the papers' long schedule.
    "fast": Preset(
        {
            **_COMMON, "method": "brecq",
            "num_samples": 256, "batch_size": 32, "iters": 200, "batch_sampling": "fixed",
            "weight_init": "gptq", "weight_range": "lp", "gptq_act_order": False, "init_margin": None,
            "rounding": "progressive", "learn_weight_scale": True, "weight_lr": 3e-3, "act_lr": 4e-4, "scale_lr": 3e-3,
        },
        rules=(_W2_ENCODER_RULE, *_ACTIVATION_RULES),
        notes={
            "method": "QDrop's dropping pays only after long schedules",
            "weight_init": "short schedule: start from GPTQ's codes",
            "rounding": "short schedule: the hard result is what was optimised",
        },
    ),
    # Minutes on a CPU for decoder LMs: fewer, longer samples in small batches; AutoRound's signed steps from
    # round-to-nearest on the min-max grid.
    "fast-lm": Preset(
        {
            **_COMMON, "method": "qdrop",
            "num_samples": 64, "batch_size": 4, "iters": 50, "batch_sampling": "fixed",
            "weight_init": "rtn", "weight_range": "minmax", "gptq_act_order": True, "init_margin": 0.05,
            "rounding": "sign", "learn_weight_scale": True, "weight_lr": 5e-3, "act_lr": 4e-4, "scale_lr": 3e-4,
        },
        rules=(
            Rule(When(weight_only=True), {"method": "brecq"}, "weight-only: no activations to drop"),
            Rule(When(max_weight_bits=2), {"batch_size": 8}, "AutoRound's batch at 2-bit weights"),
            *_ACTIVATION_RULES,
        ),
        notes={"rounding": "AutoRound's signed steps", "weight_range": "GPTQ's usual grid, no clipping"},
    ),
}  # fmt: skip

# Applied after the preset's own rules, under every preset.
COMMON_RULES: tuple[Rule, ...] = (
    Rule(When(method="qdrop"), {"drop_prob": QDROP_PROB}, "QDrop's probability"),
    Rule(When(method="rtn"), {"weight_init": "rtn"}, "plain round-to-nearest unless weight_init='gptq' is set"),
)


def preset_for(preset: str, causal_lm: bool) -> str:
    """The preset that runs: `"auto"` picks "fast-lm" for causal LMs, else "fast"."""
    if preset != AUTO:
        return preset
    return "fast-lm" if causal_lm else "fast"


def resolve(
    preset: str, weight_bits: int, act_bits: int | None = 8, method: str = AUTO, causal_lm: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """The table's value of every field it fills, with the concrete method, and the reason of each value a rule
    set. `method` is the user's (`"auto"`: the table's); `preset` must be a named one."""
    table = PRESETS[preset]
    values, why = dict(table.values), dict(table.notes)
    for rule in (*table.rules, *COMMON_RULES):
        if rule.when.matches(weight_bits, act_bits, values["method"] if method == AUTO else method, causal_lm):
            values.update(rule.values)
            why.update(dict.fromkeys(rule.values, rule.why))
    if method != AUTO:
        values["method"] = method
    return values, why


def preset_values(
    preset: str, weight_bits: int, act_bits: int | None = 8, method: str = AUTO, causal_lm: bool = False
) -> dict[str, Any]:
    """The fields `preset` fills for these widths, this method (`"auto"`: the preset's choice) and model kind."""
    return resolve(preset, weight_bits, act_bits, method, causal_lm)[0]
