"""`QLimitConfig`: what to quantize, to how many bits, and how to calibrate it."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import config_checks
from .presets import AUTO, QDROP_PROB, preset_for, resolve
from .transforms.names import check_transforms

_METHOD_NAMES = {"rtn": "round-to-nearest", "adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "QDrop"}
# The preset's choices `summary` names: the ones that change what runs, beyond the schedule's numbers.
_NOTABLE = (
    "method",
    "drop_prob",
    "weight_init",
    "weight_range",
    "gptq_act_order",
    "init_margin",
    "rounding",
    "learn_weight_scale",
    "batch_sampling",
    "batch_size",
    "quantize_attention",
    "transforms",
    "act_layout",
    "act_dynamic",
    "prob_grid",
)
_ACTIVATION_CHOICES = {"quantize_attention", "transforms", "act_layout", "act_dynamic", "prob_grid"}

# Fields the summary's start shows already (bits, method, preset, schedule) or that are not choices.
_SHOWN = {"weight_bits", "act_bits", "group_size", "weight_format", "method", "preset", "num_samples", "batch_size",
          "iters", "layer_config", "quant_method"}  # fmt: skip


class _Resolution(NamedTuple):
    """How `resolved` filled a config: the preset that ran, the values it filled, the rules' reasons."""

    preset: str
    filled: dict[str, Any]
    why: dict[str, str]
    transforms_refused: str | None = None  # why the table's transforms were left out for this model


@dataclass
class QLimitConfig(QuantizationConfigMixin):
    """Configuration of Q-Limit post-training quantization (BRECQ / QDrop block reconstruction).

    Fields left `None` (and `method="auto"`) are filled by the preset once the model is known: by
    `config.for_model(model)`, which shows the result, and when quantization starts. The table is
    `hf_qlimit.presets.PRESETS`; why its values differ: docs/design/short-budget-schedule.md.

    Args:
        **Scheme**: what is quantized, to how many bits.

        weight_bits (`int`, *optional*, defaults to 4):
            Bits of the weights of the transformer blocks' Linears (2-8).
        act_bits (`int`, *optional*, defaults to 8):
            Bits of the activations (inputs of every quantized Linear and of the attention matmuls); `None`
            quantizes the weights only.
        group_size (`int`, *optional*):
            Weights share one scale per `group_size` input features; `None` is one scale per output channel.
        weight_sym (`bool`, *optional*, defaults to `False`):
            Symmetric weight grid instead of an asymmetric one (with a zero point).
        act_sym (`bool`, *optional*, defaults to `False`):
            Symmetric activation grids instead of asymmetric ones.
        first_last_bits (`int`, *optional*, defaults to 8):
            Bits of the embeddings and of the task / LM head, in weights and in their input activations; `None`
            leaves them in full precision.
        modules_to_not_convert (`list[str]`, *optional*):
            fnmatch patterns of module names kept in full precision.
        module_bits (`dict[str, int]`, *optional*, defaults to `{}`):
            fnmatch pattern or module name -> weight bits, applied after the rules above. Mixed precision writes
            its allocation here.
        quantize_attention (`bool`, *optional*):
            Also quantize the inputs of the Q·Kᵀ and P·V matmuls (when `act_bits` is set). Unset: True, but False
            for decoder LMs under the fast presets (as SmoothQuant-class W8A8 does; measured in
            docs/results/language-modeling.md).
        weight_format (`str`, *optional*):
            Quantize on the grid of a file format, so that exporting to it is lossless: a GGUF type
            (`"gguf:q4_0"`, `"gguf:q4_1"`, `"gguf:q5_0"`, `"gguf:q5_1"`, `"gguf:q8_0"`, and the k-quants
            `"gguf:q2_k"` to `"gguf:q6_k"`). It sets `weight_bits`, `group_size` and `weight_sym` (a value set
            otherwise that contradicts it is an error) and stores weights only (`act_bits=None`; the default 8
            is dropped). The embedding and head take the GGUF type of `first_last_bits` (8: Q8_0), and
            `module_bits` entries the type of their bits (3: Q3_K, 6: Q6_K, ...). A k-quant's sub-block scales
            are snapped onto its super-blocks of 256 (fp16 steps, integer multipliers) and kept while the rounding
            is learned (`learn_weight_scale` is off for them); a module whose rows do not split into 256 takes
            llama.cpp's fallback type (Q2_K, Q3_K: Q4_0; Q4_K: Q5_0; Q5_K: Q5_1; Q6_K: Q8_0), logged.
        lp_norm (`float`, *optional*, defaults to 2.4):
            The p of the Lp error that the initial weight and activation range search minimises.

        **Calibration**: which algorithm runs, on how much data.

        method (`str`, *optional*, defaults to `"auto"`):
            `"rtn"` (round to nearest), `"adaround"` (each Linear on its own), `"brecq"` (block reconstruction),
            `"qdrop"` (block reconstruction dropping activation quantization with probability `drop_prob`) or
            `"auto"`: the preset's choice ("brecq" under "fast" and for weight-only "fast-lm", else "qdrop").
            The method says what is reconstructed, `rounding` how the weights round: `"adaround"` runs the preset's
            rounding Linear by Linear, AdaRound's annealed update only under "paper" (or with
            `rounding="anneal"`): under "fast-lm" AutoRound-style signed steps, under "fast" progressive hardening.
        preset (`str`, *optional*, defaults to `"auto"`):
            `"fast"` (encoders, minutes on a CPU), `"fast-lm"` (decoder LMs), `"paper"` (the papers' exact
            setting) or `"auto"` ("fast-lm" for causal LMs, else "fast"): fills every field left unset.
        num_samples (`int`, *optional*):
            Calibration samples used; `None`: the preset's.
        batch_size (`int`, *optional*):
            Samples per reconstruction step; `None`: the preset's ("fast-lm": larger at 2-bit weights).
        iters (`int`, *optional*):
            Reconstruction iterations per block; `None`: the preset's.
        max_length (`int`, *optional*, defaults to 512):
            Calibration sequences are truncated to this many tokens.
        seed (`int`, *optional*, defaults to 0):
            Seed of sampling and dropping; the same seed and data give identical tensors.

        **Reconstruction** (expert; `None` takes the preset's value).

        drop_prob (`float`, *optional*):
            QDrop's probability of keeping an activation in full precision (in steps of 2⁻¹⁶); read only by
            `"qdrop"`. `None`: 0.5 with `"qdrop"`, else 0. Set with `method="auto"`, it picks "qdrop" (> 0) or
            "brecq" (0).
        loss (`str`, *optional*):
            `"mse"` or `"fisher"`: the output error weighted by (|g| + d)², g the gradients of the KL at the
            block output normalised to mean |g| = 1, d = `fisher_damping`.
        fisher_damping (`float`, *optional*):
            d above; 0 weights by g² alone, where a few tokens carry most of the loss.
        rounding (`str`, *optional*):
            `"anneal"` (AdaRound: the β regulariser pushes h to 0 or 1, hard rounding at the end),
            `"progressive"` (as anneal, but after warm-up the most decided h are fixed in rounds, all of them by
            80% of the iterations) or `"sign"` (AutoRound: offsets in [−½, ½] moved by signed steps of
            `weight_lr` decaying to 0, the best iterate kept).
        weight_init (`str`, *optional*):
            Where the rounding starts: `"rtn"` (the FP weight) or `"gptq"` (GPTQ's error-compensated codes).
            With `method="rtn"` unset means `"rtn"`; `method="rtn", weight_init="gptq"` gives GPTQ's codes.
        weight_range (`str`, *optional*):
            The weight grid before any learning: `"lp"` (each row's or group's clipping minimising the Lp error,
            p = `lp_norm`) or `"minmax"` (no clipping, GPTQ's usual grid).
        gptq_act_order (`bool`, *optional*):
            With `weight_init="gptq"`, round the columns by decreasing Hessian diagonal (nothing extra stored).
        init_margin (`float`, *optional*):
            With `weight_init="gptq"`, AdaRound's h start this far (in (0, 0.5)) from GPTQ's decision; `None`
            starts them at frac(w̃/s).
        learn_weight_scale (`bool`, *optional*):
            Learn each row's (group's) dequantization step with the rounding; with `"sign"`, its min and max.
        weight_lr (`float`, *optional*):
            Learning rate of the rounding variables.
        act_lr (`float`, *optional*):
            Adam learning rate of the activation step sizes.
        scale_lr (`float`, *optional*):
            Adam learning rate of the learned weight steps (on their log).
        round_loss_weight (`float`, *optional*):
            λ of the AdaRound regulariser.
        beta_range (`tuple[float, float]`, *optional*):
            (start, end) of the annealed β of the AdaRound regulariser.
        warmup (`float`, *optional*):
            Fraction of the iterations (in [0, 1)) before the regulariser starts.
        batch_sampling (`str`, *optional*):
            Each step's mini-batch: `"random"` (`batch_size` samples drawn anew from all of them, the papers'
            code) or `"fixed"` (one of the length-sorted calibration batches, one block call per step).

        **Mixed precision**: each block Linear gets its own weight bits within a budget.

        bit_candidates (`list[int]`, *optional*):
            The weight bit-widths a block Linear may get, e.g. `[2, 4, 8]`; `None` gives every one `weight_bits`.
        avg_bits (`float`, *optional*):
            Budget as the average weight bits over the block Linears.
        size_budget_bytes (`int`, *optional*):
            Budget as the bytes of the block Linears' packed weights (codes, scales, zero points).
        bops_budget (`float`, *optional*):
            Extra budget in bit-operations (weight bits × activation bits × MACs per token).
        sensitivity_cache (`str`, *optional*):
            JSON file keeping measured sensitivities, so that other budgets skip the measurement (checked to be
            no folder when quantization reads it, not when the config is built).

        **Outliers and activations**.

        transforms (`list[str]`, *optional*):
            Function-preserving transforms of the FP model before quantization, in this order whatever the list's:
            `"smoothquant[@α]"` or `"os_plus[@α]"` (at most one; α in [0, 1], default 0.5), `"hadamard_down"`,
            `"hadamard_inputs"` (see `hf_qlimit.transforms.apply`). Unset, under the fast presets and where the
            model can take them: `["hadamard_inputs"]` at `act_bits` <= 4, `["hadamard_down"]` for decoder LMs with
            8-bit activations, else none; `[]` for none at all.
        act_layout (`str`, *optional*):
            `"per_linear"` (one input quantizer per Linear), `"shared"` (one per tensor: Q/K/V, gate/up) or
            `"block_output"` (shared, and post-LN blocks quantize their output for the next block's Q/K/V).
            Unset: `"shared"` at `act_bits` <= 4, else `"per_linear"` (`"per_linear"` under `preset="paper"`).
        prob_bits (`int`, *optional*):
            Bits of the attention probabilities (2-8); `None`: `act_bits`.
        prob_grid (`str`, *optional*):
            Grid of the attention probabilities: `"uniform"` (asymmetric, its range from the Lp search), `"unit"`
            (fixed to [0, 1], step 1/(2^b − 1): never clips, but rounds probabilities below half a step to 0) or
            `"log2"`. Unset: `"unit"` for decoder LMs, `"uniform"` otherwise and under `preset="paper"`.
        act_dynamic (`bool`, *optional*):
            Block Linear inputs get a grid per token computed at run time instead of a calibrated static one.
            Unset: True for decoder LMs, False otherwise and under `preset="paper"`.
        act_fp_first_token (`bool`, *optional*, defaults to `False`):
            Decoder LMs: the token at position 0 (the attention sink) skips activation quantization.

        **Filled by quantization**.

        layer_config (`dict[str, dict]`, *optional*, defaults to `{}`):
            The resolved bits of every converted module, which `from_pretrained` rebuilds. Not set by hand.
    """

    # Scheme
    weight_bits: int = 4
    act_bits: int | None = 8
    group_size: int | None = None
    weight_sym: bool = False
    act_sym: bool = False
    first_last_bits: int | None = 8
    modules_to_not_convert: list[str] | None = None
    module_bits: dict[str, int] = field(default_factory=dict)
    quantize_attention: bool | None = None
    weight_format: str | None = None
    lp_norm: float = 2.4
    # Calibration
    method: str = AUTO
    preset: str = AUTO
    num_samples: int | None = None
    batch_size: int | None = None
    iters: int | None = None
    max_length: int | None = 512
    seed: int = 0
    # Reconstruction (expert): None is the preset's
    drop_prob: float | None = None
    loss: str | None = None
    fisher_damping: float | None = None
    rounding: str | None = None
    weight_init: str | None = None
    weight_range: str | None = None
    gptq_act_order: bool | None = None
    init_margin: float | None = None
    learn_weight_scale: bool | None = None
    weight_lr: float | None = None
    act_lr: float | None = None
    scale_lr: float | None = None
    round_loss_weight: float | None = None
    beta_range: tuple[float, float] | None = None
    warmup: float | None = None
    batch_sampling: str | None = None
    # Mixed precision
    bit_candidates: list[int] | None = None
    avg_bits: float | None = None
    size_budget_bytes: int | None = None
    bops_budget: float | None = None
    sensitivity_cache: str | None = None
    # Outliers and activations
    transforms: list[str] | None = None
    act_layout: str | None = None
    prob_bits: int | None = None
    prob_grid: str | None = None
    act_dynamic: bool | None = None
    act_fp_first_token: bool = False
    # Filled by quantization
    layer_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant_method: str = "qlimit"

    def __post_init__(self) -> None:
        self.quant_method = "qlimit"
        # Containers as saved (JSON has lists): normalised before they are checked.
        if isinstance(self.beta_range, list):
            self.beta_range = tuple(self.beta_range)
        if isinstance(self.modules_to_not_convert, tuple):
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if isinstance(self.transforms, tuple):
            self.transforms = list(self.transforms)
        if isinstance(self.sensitivity_cache, os.PathLike):
            self.sensitivity_cache = os.fspath(self.sensitivity_cache)
        grid = config_checks.weight_format_grid(self)
        if grid is not None:  # a format fixes the grid, and stores weights only
            self.weight_bits, self.group_size, self.weight_sym = grid.bits, grid.group, grid.symmetric
            self.act_bits = None
        self.validate()
        if self.beta_range is not None:
            self.beta_range = tuple(float(b) for b in self.beta_range)
        self.module_bits = dict(self.module_bits or {})
        if self.bit_candidates is not None:
            self.bit_candidates = sorted(set(self.bit_candidates))

    def for_model(self, model: Any) -> QLimitConfig:
        """`resolved` for this model's family: what `quantize_qlimit(calib_ds, config)` will run."""
        from .models import get_adapter, is_causal_lm
        from .transforms.support import default_refusal

        return self.resolved(
            causal_lm=is_causal_lm(model),
            transform_refusal=lambda names: default_refusal(model, get_adapter(model), names),
        )

    def resolved(
        self, causal_lm: bool, transform_refusal: Callable[[list[str]], str | None] | None = None
    ) -> QLimitConfig:
        """A copy with every unset field filled by the preset's table (`hf_qlimit.presets`) and a concrete
        `method`. `preset` stays recorded as given; the filled fields say what ran.

        `transform_refusal(names)` says why the model cannot take the table's `transforms` (None: it can); a
        refused table value is left out, and the summary says why. A checkpoint's config (`layer_config` filled)
        comes back as it is: its unset fields were unset when it ran."""
        out = copy.deepcopy(self)
        preset = preset_for(self.preset, causal_lm)
        method = self.method
        if method == AUTO and self.drop_prob is not None:  # a drop_prob set by hand asks for QDrop's dropping, or not
            method = "qdrop" if self.drop_prob > 0 else "brecq"
        values, why = resolve(preset, self.weight_bits, self.act_bits, method, causal_lm)
        if method != self.method:
            why["method"] = f"drop_prob {self.drop_prob} set"
        if self.layer_config:  # a quantized checkpoint's config: what ran is recorded, nothing is left to fill
            values, why = {"method": self.method}, {}
        refused = None
        if self.transforms is None and values.get("transforms") and transform_refusal is not None:
            refused = transform_refusal([base for base, _ in check_transforms(values["transforms"])])
        if refused is not None:
            values.pop("transforms")
        filled = {}
        for key, value in values.items():
            unset = out.method == AUTO if key == "method" else getattr(out, key) is None
            if unset and value is not None:
                setattr(out, key, value)
                filled[key] = value
        out.validate()
        out._resolution = _Resolution(preset, filled, why, refused)
        return out

    @property
    def weight_range_p(self) -> float | None:
        """The p of the weight range search, or None for the plain [min, max] grid."""
        return None if self.weight_range == "minmax" else self.lp_norm  # unset (not resolved): the papers' search

    @property
    def drop_probability(self) -> float:
        """Probability that an activation stays in full precision during reconstruction (0 unless QDrop)."""
        if self.method != "qdrop":
            return 0.0
        return self.drop_prob if self.drop_prob is not None else QDROP_PROB  # unset: what `resolved` fills

    def validate(self) -> None:
        """Raises `ValueError` naming the first field that holds an impossible value, and what it may hold."""
        config_checks.validate(self)

    def summary(self) -> str:
        """One line saying what a resolved config runs and which of its choices the preset made (logged when
        quantization starts)."""
        bits = f"W{self.weight_bits}" + (f"A{self.act_bits}" if self.act_bits is not None else " weight-only")
        bits += f" g{self.group_size}" if self.group_size is not None else ""
        bits += f" on {self.weight_format}'s grid" if self.weight_format is not None else ""
        resolution = getattr(self, "_resolution", None)
        if resolution is None:
            return (
                f"{self.method} {bits}, preset {self.preset}: unset fields are filled when the model is known "
                "(config.for_model(model) shows them)."
            )
        runs = _METHOD_NAMES[self.method]
        if self.method == "qdrop":
            runs += f" (drop_prob {self.drop_prob}" + (", i.e. BRECQ)" if self.drop_prob == 0 else ")")
        elif self.method == "adaround" and self.rounding not in (None, "anneal"):  # the preset's rounding runs
            runs += f" (Linear by Linear, {self.rounding} rounding, not AdaRound's annealed update)"
        elif self.method == "rtn" and self.weight_init == "gptq":
            runs = "GPTQ (round-to-nearest from GPTQ's codes)"
        preset = resolution.preset + (" (auto)" if self.preset == AUTO else "")
        schedule = f"{self.num_samples} samples"
        if self.method != "rtn":
            schedule += f", batch {self.batch_size}, {self.iters} iterations per block"
        keys = [k for k in _NOTABLE if k in resolution.filled and self._matters(k, resolution)]
        chosen = []
        for i, key in enumerate(keys):  # a reason once, after the last of the keys in a row that share it
            why = resolution.why.get(key)
            last = i + 1 == len(keys) or resolution.why.get(keys[i + 1]) != why
            chosen.append(f"{key} {resolution.filled[key]!r}" + (f" ({why})" if why and last else ""))
        line = f"{runs} {bits}, preset {preset}: {schedule}"
        line += "; chosen by the preset: " + ", ".join(chosen) if chosen else ""
        if resolution.transforms_refused is not None:
            line += f"; no rotations for this model: {resolution.transforms_refused}"
        # every other choice a run makes, so that its log line names it: what the preset did not fill
        given = [f"{k}={v!r}" for k, v in self.non_default(_SHOWN | set(resolution.filled)).items()]
        return line + ("; set otherwise than the defaults: " + ", ".join(given) if given else "")

    def non_default(self, skip: Iterable[str] = ()) -> dict[str, Any]:
        """The fields (but `skip`) whose value differs from `QLimitConfig()`'s: the choices made for this run."""
        defaults, skip = QLimitConfig(), set(skip)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(defaults, f.name)
        }

    def _matters(self, key: str, resolution: _Resolution) -> bool:
        """Whether the preset's value of `key` changes what this method runs (for `summary`)."""
        if key == "batch_size":
            return key in resolution.why  # the base value is in the schedule already; a rule's is not expected
        if key == "drop_prob":
            return self.method == "qdrop"
        if key in ("gptq_act_order", "init_margin") and self.weight_init != "gptq":
            return False
        if key == "prob_grid" and not self.quantize_attention:
            return False  # no probabilities are quantized
        if key in _ACTIVATION_CHOICES:  # shown where they differ from the papers' activations
            return self.act_bits is not None and key in resolution.why
        return self.method != "rtn" or key in ("method", "weight_init", "weight_range", "gptq_act_order")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        if out["beta_range"] is not None:
            out["beta_range"] = list(out["beta_range"])
        return out

    def __iter__(self):
        """`dict(config)`: the fields, as `to_dict` (not the attributes `resolved` adds)."""
        yield from self.to_dict().items()

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
