"""`QLimitConfig`: what to quantize, to how many bits, and how to calibrate it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

METHODS = ("rtn", "adaround", "brecq", "qdrop")
LOSSES = ("mse", "fisher")
ROUNDINGS = ("anneal", "progressive", "sign")
WEIGHT_INITS = ("rtn", "gptq")
WEIGHT_RANGES = ("lp", "minmax")
BATCH_SAMPLINGS = ("fixed", "random")

# Reconstruction settings of each preset; a field set by hand wins. "paper" is exactly the BRECQ/QDrop setting
# (20k iterations, β-annealed rounding from the FP weight on a fixed grid). "fast" is fitted to a run of minutes on
# a CPU: with 100× fewer iterations the paper's learning rates barely move V (most h stay undecided, the hard
# result is RTN), so it starts from GPTQ's codes, hardens the rounding progressively, learns the weight steps with
# it and steps faster. "fast-lm" is its decoder-LM variant: fewer, longer samples in small batches, so a 135M
# model quantizes in minutes on a CPU, and AutoRound's signed steps from round-to-nearest on the min-max grid,
# which measured better on SmolLM2 than AdaRound from GPTQ's codes (benchmarks/lm_ablation.py). "auto" (the
# default) picks "fast-lm" for causal LMs, else "fast".
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"num_samples": 1024, "batch_size": 32, "iters": 20000, "rounding": "anneal", "learn_weight_scale": False,
              "weight_lr": 1e-3, "act_lr": 4e-5, "scale_lr": 1e-3, "weight_init": "rtn",
              "weight_range": "lp", "gptq_act_order": False, "batch_sampling": "random"},
    "fast": {"num_samples": 256, "batch_size": 32, "iters": 200, "rounding": "progressive", "learn_weight_scale": True,
             "weight_lr": 3e-3, "act_lr": 4e-4, "scale_lr": 3e-3, "weight_init": "gptq",
             "weight_range": "lp", "gptq_act_order": False, "batch_sampling": "fixed"},
    "fast-lm": {"num_samples": 64, "batch_size": 4, "iters": 50, "rounding": "sign", "learn_weight_scale": True,
                "weight_lr": 5e-3, "act_lr": 4e-4, "scale_lr": 3e-4, "weight_init": "rtn", "init_margin": 0.05,
                "weight_range": "minmax", "gptq_act_order": True, "batch_sampling": "fixed"},
}  # fmt: skip
# At 2 bits "fast-lm" steps on batches of 8 (AutoRound's): on SmolLM2 W2 g64 batch 8 gave 86.22 against 99.73 at
# batch 4, while at W3 batch 4 was better (35.95 against 37.23) and at W4 even (31.70 / 31.75).
LOW_BITS_BATCH = {"fast-lm": (2, 8)}
# "fast" keeps fixed batches: random draws (the papers' code) gave 2% less held-out error on MiniLM STS-B block 0
# W2A8 at 200 iterations, for 2.3x the time (several small block calls per step; benchmarks/convergence.py).
AUTO = "auto"


def preset_values(preset: str, weight_bits: int) -> dict[str, Any]:
    """The fields `preset` fills for this weight width."""
    values = dict(PRESETS[preset])
    if preset in LOW_BITS_BATCH and isinstance(weight_bits, int) and weight_bits <= LOW_BITS_BATCH[preset][0]:
        values["batch_size"] = LOW_BITS_BATCH[preset][1]
    return values
_RECON_DEFAULTS: dict[str, Any] = {
    "round_loss_weight": 0.01,
    "beta_range": (20.0, 2.0),
    "warmup": 0.2,
    "loss": "mse",
    "fisher_damping": 1.0,
}


def default_drop_prob(preset: str, act_bits: int | None) -> float:
    """QDrop's probability when unset: the papers' 0.5 under "paper", but 0 (BRECQ) where dropping measured worse,
    so that the blocks train on the very inputs they will see:
    - "fast", at every activation width. MiniLM at 200 iterations, BRECQ against QDrop: W4A4 STS-B 67.2 ± 0.9
      against 58.3 ± 2.8 (3 seeds each), SST-2 81.3 against 78.6; W2A8 STS-B 81.8 against 81.0, SQuAD F1 55.36
      against 53.40, SST-2 88.2 both (README default table). QDrop trains a half-FP network; its flatter solution
      pays after the papers' 20k iterations, and in 200 only the mismatch is left (README, seed study);
    - weight-only decoders ("fast-lm" with no activation quantizer): row "brecq" of `benchmarks/lm_ablation.py`."""
    if preset == "fast" or (preset == "fast-lm" and act_bits is None):
        return 0.0
    return 0.5


def _check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        allowed = "an integer from 2 to 8" + (", or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


@dataclass
class QLimitConfig(QuantizationConfigMixin):
    """Configuration of Q-Limit post-training quantization (BRECQ / QDrop block reconstruction).

    Args:
        weight_bits: bits of the weights of the transformer blocks (2-8).
        act_bits: bits of the activations (inputs of every quantized Linear and of the attention matmuls),
            or `None` for weight-only quantization.
        method: `"rtn"` (round to nearest), `"adaround"` (each Linear on its own), `"brecq"` (block
            reconstruction) or `"qdrop"` (block reconstruction with activation dropping).
        group_size: weights share one scale per `group_size` input features; `None` is one per output channel.
        weight_sym / act_sym: symmetric instead of asymmetric (zero-point) grids.
        first_last_bits: bits of the embeddings and of the task / LM head, in weights and in their input
            activations; `None` leaves them in full precision.
        modules_to_not_convert: fnmatch patterns of module names kept in full precision.
        module_bits: fnmatch pattern or module name -> weight bits, applied after the rules above. Mixed
            precision writes its allocation here.
        quantize_attention: also quantize the inputs of the Q·Kᵀ and P·V matmuls (when `act_bits` is set).
        lp_norm: the p of the Lp error minimised by the initial range search.
        preset: `"auto"` (default: `"fast-lm"` for causal LMs, `"fast"` for the others, chosen when quantizing),
            `"fast"`, `"fast-lm"` or `"paper"` (the papers' exact setting); fills every reconstruction field left
            unset (`num_samples`, `batch_size`, `iters`, learning rates, `rounding`, `weight_init`...).
        num_samples, batch_size, iters: calibration samples, reconstruction batch size, iterations per block.
        round_loss_weight: λ of the AdaRound regulariser.
        beta_range: (start, end) of the annealed β of the AdaRound regulariser.
        warmup: fraction of the iterations before the regulariser starts.
        drop_prob: QDrop's probability of keeping an activation in full precision (applied in steps of 2⁻¹⁶).
            Unset: 0.5, except 0 (BRECQ) under `"fast"` and for weight-only decoders under `"fast-lm"`, where
            dropping measured worse at short budgets (see `default_drop_prob`).
        loss: `"mse"` or `"fisher"` (output error weighted by (|g| + d)², g the gradients of the KL at the block
            output normalised to mean |g| = 1, d = `fisher_damping`; BRECQ's own code uses (|g| + 1)²).
        fisher_damping: d above; 0 weights by g² alone, where a few tokens carry most of the loss.
        weight_lr, act_lr: Adam learning rates of the rounding variables and of the activation step sizes.
        rounding: `"anneal"` (AdaRound: the β regulariser pushes h to 0 or 1, hard rounding at the end) or
            `"progressive"` (as anneal, but after warm-up the most decided h are fixed in rounds, all of them by
            80% of the iterations, so the hard result is what was optimised) or `"sign"` (AutoRound's update:
            offsets in [−½, ½] before a straight-through rounding, steps of `weight_lr` · sign(gradient) decaying
            linearly to 0, the best iterate kept; with `learn_weight_scale` each group's min and max are learned
            too, within [½, 1] of their start).
        weight_init: where the rounding starts: `"rtn"` (the FP weight; AdaRound's init) or `"gptq"` (GPTQ's
            error-compensated weight from the Hessian of each Linear's calibration inputs). Unset: the preset's
            ("gptq" for "fast"), except that `method="rtn"` stays plain round-to-nearest; `method="rtn",
            weight_init="gptq"` gives GPTQ's codes.
        weight_range: the weight grid before any learning: `"lp"` (the papers': each row's or group's clipping of
            [min, max] minimising the Lp error, p = `lp_norm`) or `"minmax"` (no clipping, GPTQ's usual grid).
            Unset: the preset's.
        gptq_act_order: with `weight_init="gptq"`, round the columns in order of decreasing Hessian diagonal
            (GPTQ's act-order; each column keeps its own group's grid, so nothing extra is stored). Unset: the
            preset's.
        init_margin: with `weight_init="gptq"`, AdaRound's h start this far from GPTQ's decision (0 or 1), so the
            soft block starts at GPTQ's hard result; `None` starts h at frac(w̃/s), where the unrounded w̃ is a
            poor model (its error feedback assumes the earlier columns already rounded).
        learn_weight_scale: learn each row's (group's) dequantization step with the rounding (Adam on its log,
            lr `scale_lr`); the learned steps are what gets saved.
        batch_sampling: each reconstruction step's mini-batch: `"random"` (`batch_size` samples drawn anew from all
            calibration samples, as the papers' code does; each batch's share runs at that batch's own length) or
            `"fixed"` (one of the length-sorted calibration batches, one block call per step). Unset: the
            preset's ("random" for "paper").
        seed: seed of sampling and dropping; the same seed and data give identical tensors.
        max_length: calibration sequences are truncated to this many tokens.
        bit_candidates: mixed precision: the weight bit-widths each block Linear may get, e.g. [2, 4, 8]. `None`
            (the default) quantizes every block Linear to `weight_bits`.
        avg_bits: mixed-precision budget as the average weight bits over the block Linears.
        size_budget_bytes: mixed-precision budget as the bytes of the block Linears' packed weights.
        bops_budget: optional extra budget in bit-operations (weight bits × activation bits × MACs per token).
        sensitivity_cache: file where measured sensitivities are kept, so other budgets skip the measurement.
        layer_config: filled in by quantization: the resolved bits of every converted module, which
            `from_pretrained` rebuilds. Not meant to be set by hand.
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    method: str = "qdrop"
    group_size: int | None = None
    weight_sym: bool = False
    act_sym: bool = False
    first_last_bits: int | None = 8
    modules_to_not_convert: list[str] | None = None
    module_bits: dict[str, int] = field(default_factory=dict)
    quantize_attention: bool = True
    lp_norm: float = 2.4
    preset: str = AUTO
    num_samples: int | None = None
    batch_size: int | None = None
    iters: int | None = None
    round_loss_weight: float | None = None
    beta_range: tuple[float, float] | None = None
    warmup: float | None = None
    drop_prob: float | None = None
    loss: str | None = None
    weight_lr: float | None = None
    act_lr: float | None = None
    rounding: str | None = None
    weight_init: str | None = None
    init_margin: float | None = None
    weight_range: str | None = None
    gptq_act_order: bool | None = None
    learn_weight_scale: bool | None = None
    scale_lr: float | None = None
    fisher_damping: float | None = None
    batch_sampling: str | None = None
    seed: int = 0
    max_length: int | None = 512
    bit_candidates: list[int] | None = None
    avg_bits: float | None = None
    size_budget_bytes: int | None = None
    bops_budget: float | None = None
    sensitivity_cache: str | None = None
    # Activation outliers (issue 19; checked by hf_qlimit.transforms / hf_qlimit.integration): function-preserving
    # transforms applied to the FP model first ("smoothquant[@α]", "os_plus[@α]", "hadamard_down",
    # "hadamard_inputs"); "shared": one input quantizer per tensor (Q/K/V, gate/up) instead of one per Linear;
    # "block_output": shared, and post-LN blocks (BERT) quantize their output, inside their own loss, for the next
    # block's Q/K/V;
    # attention probabilities on their own bits and/or a "log2" grid; dynamic per-token Linear-input grids;
    # decoders: the token at position 0 (the attention sink) kept out of activation quantization (PrefixQuant).
    transforms: list[str] | None = None
    act_layout: str = "per_linear"
    prob_bits: int | None = None
    prob_grid: str = "uniform"
    act_dynamic: bool = False
    act_fp_first_token: bool = False
    layer_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant_method: str = "qlimit"

    def __post_init__(self) -> None:
        self.quant_method = "qlimit"
        if self.preset not in PRESETS and self.preset != AUTO:
            raise ValueError(f"`preset` must be one of {[AUTO, *PRESETS]}, got {self.preset!r}.")
        # "auto" fills its preset's fields when the model is known (`resolved`)
        preset = preset_values(self.preset, self.weight_bits) if self.preset in PRESETS else {}
        for key, value in {**_RECON_DEFAULTS, **preset}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.drop_prob is None and self.preset != AUTO:
            self.drop_prob = default_drop_prob(self.preset, self.act_bits)
        self.beta_range = tuple(float(b) for b in self.beta_range)
        self.module_bits = dict(self.module_bits or {})
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        self.validate()

    @property
    def weight_range_p(self) -> float | None:
        """The p of the weight range search, or None for the plain [min, max] grid."""
        return None if self.weight_range == "minmax" else self.lp_norm  # unset (not resolved): the papers' search

    def for_model(self, model: Any) -> "QLimitConfig":
        """`resolved` for this model's family: what `quantize_qlimit(calib_ds, config)` will run."""
        from .models import get_adapter

        return self.resolved(causal_lm=get_adapter(model).causal_lm)

    def resolved(self, causal_lm: bool) -> "QLimitConfig":
        """A copy with every field the preset fills set; "auto" becomes "fast-lm" for a causal LM, else "fast".
        The preset stays recorded as given (the filled fields say what ran)."""
        out = copy.deepcopy(self)
        preset = ("fast-lm" if causal_lm else "fast") if self.preset == AUTO else self.preset
        if out.method == "rtn" and out.weight_init is None:  # plain round-to-nearest unless GPTQ is asked for
            out.weight_init = "rtn"
        for key, value in preset_values(preset, out.weight_bits).items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.drop_prob is None:
            out.drop_prob = default_drop_prob(preset, out.act_bits)
        out.validate()
        return out

    def validate(self) -> None:
        """Raises `ValueError` naming the first field that holds an impossible value."""
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        for name, bits in self.module_bits.items():
            _check_bits(f"module_bits[{name!r}]", bits)
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {self.loss!r}.")
        # A field left None here is one "auto" fills once the model is known (`resolved` validates again).
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise ValueError(f"`rounding` must be one of {list(ROUNDINGS)}, got {self.rounding!r}.")
        if self.init_margin is not None and not 0 < self.init_margin < 0.5:
            raise ValueError(f"`init_margin` must lie in (0, 0.5), got {self.init_margin!r}.")
        if self.weight_range is not None and self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"`weight_range` must be one of {list(WEIGHT_RANGES)}, got {self.weight_range!r}.")
        if self.batch_sampling is not None and self.batch_sampling not in BATCH_SAMPLINGS:
            raise ValueError(f"`batch_sampling` must be one of {list(BATCH_SAMPLINGS)}, got {self.batch_sampling!r}.")
        if self.weight_init is not None and self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"`weight_init` must be one of {list(WEIGHT_INITS)}, got {self.weight_init!r}.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"`group_size` must be a positive integer or None, got {self.group_size!r}.")
        for name in ("num_samples", "batch_size", "iters"):
            value = getattr(self, name)
            if value is None and self.preset == AUTO:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "iters" else 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.bit_candidates is not None:
            if not self.bit_candidates:
                raise ValueError("`bit_candidates` must list at least one bit-width, e.g. [2, 4, 8].")
            for bits in self.bit_candidates:
                _check_bits("bit_candidates", bits)
            self.bit_candidates = sorted(set(self.bit_candidates))
            if self.avg_bits is None and self.size_budget_bytes is None:
                raise ValueError("Mixed precision (`bit_candidates`) needs a budget: set `avg_bits` or `size_budget_bytes`.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer or None, got {self.max_length!r}.")
        if self.drop_prob is not None and not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"`drop_prob` must lie in [0, 1], got {self.drop_prob!r}.")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"`warmup` must lie in [0, 1), got {self.warmup!r}.")
        if len(self.beta_range) != 2 or min(self.beta_range) <= 0:
            raise ValueError(f"`beta_range` must be two positive numbers (start, end), got {self.beta_range!r}.")
        if self.lp_norm <= 0:
            raise ValueError(f"`lp_norm` must be positive, got {self.lp_norm!r}.")
        for name in ("round_loss_weight", "weight_lr", "act_lr", "scale_lr", "fisher_damping"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)!r}.")

    def summary(self) -> str:
        """One line saying what a resolved config runs (logged when quantization starts)."""
        kind = "BRECQ" if self.drop_probability == 0 else "QDrop"
        return (f"{self.method}: {self.iters} iterations per block, batch {self.batch_size}, "
                f"drop_prob {self.drop_probability} ({kind})")

    @property
    def drop_probability(self) -> float:
        """Probability that an activation stays in full precision during reconstruction (0 unless QDrop)."""
        return self.drop_prob if self.method == "qdrop" else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out["beta_range"] = list(out["beta_range"])
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(
                f"Unknown QLimitConfig fields {unknown}: the checkpoint was written by another hf_qlimit version "
                f"or is not a qlimit checkpoint. Known fields: {sorted(known)}."
            )
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
