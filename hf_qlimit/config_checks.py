"""The values each `QLimitConfig` field may hold, checked when the config is built (`QLimitConfig.validate`).

Every message names the field, what it may hold and what it got. `None` in a reconstruction field means
"the preset's" and always passes here; `resolved` checks the filled values again. Only the values themselves are
checked: a checkpoint's config is rebuilt on every `from_pretrained`, on whatever machine loads it, so what depends
on the local files (is `sensitivity_cache` a folder?) is checked where quantization uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.utils import logging

from .presets import AUTO, METHODS, PRESETS
from .quantizers.formats import GGUF_FOR_BITS, GGUF_FORMATS, Format
from .transforms.names import check_transforms

logger = logging.get_logger(__name__)

LOSSES = ("mse", "fisher")
ROUNDINGS = ("anneal", "progressive", "sign")
WEIGHT_INITS = ("rtn", "gptq")
WEIGHT_RANGES = ("lp", "minmax")
BATCH_SAMPLINGS = ("fixed", "random")
ACT_LAYOUTS = ("per_linear", "shared", "block_output")
PROB_GRIDS = ("uniform", "unit", "log2")

_PRESET_FILLS = ", or None for the preset's"


def _fail(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bits(name: str, value: Any, none: str = "") -> None:
    """2-8 bits; `none` says what None means where it is allowed."""
    if value is None and none:
        return
    if not _is_int(value) or not 2 <= value <= 8:
        _fail(name, "an integer from 2 to 8" + (f", or None {none}" if none else ""), value)


def choice(name: str, value: Any, allowed: Sequence[str], unset: str = "") -> None:
    if value is None and unset:
        return
    if value not in allowed:
        _fail(name, f"one of {list(allowed)}{unset}", value)


def flag(name: str, value: Any, unset: str = "") -> None:
    if value is None and unset:
        return
    if not isinstance(value, bool):
        _fail(name, f"True or False{unset}", value)


def integer(name: str, value: Any, minimum: int, unset: str = "") -> None:
    if value is None and unset:
        return
    if not _is_int(value) or value < minimum:
        _fail(name, ("a positive integer" if minimum == 1 else f"an integer >= {minimum}") + unset, value)


def number(name: str, value: Any, low: float, high: float | None = None, closed: str = "[]", unset: str = "") -> None:
    """A number in the interval from `low` to `high` (None: no bound), `closed` giving its brackets."""
    if value is None and unset:
        return
    above = _is_number(value) and (value >= low if closed[0] == "[" else value > low)
    below = high is None or (_is_number(value) and (value <= high if closed[1] == "]" else value < high))
    if not (above and below):
        upper = "∞)" if high is None else f"{high:g}{closed[1]}"
        interval = f"{closed[0]}{low:g}, {upper}"
        _fail(name, f"a number in {interval}{unset}", value)


def scheme(config: Any) -> None:
    bits("weight_bits", config.weight_bits)
    bits("act_bits", config.act_bits, none="for weight-only quantization")
    bits("first_last_bits", config.first_last_bits, none="to keep the embeddings and head in full precision")
    integer("group_size", config.group_size, 1, unset=", or None for one scale per output channel")
    flag("weight_sym", config.weight_sym)
    flag("act_sym", config.act_sym)
    flag("quantize_attention", config.quantize_attention, ", or None (the preset's)")
    number("lp_norm", config.lp_norm, 0, closed="(]")
    patterns = config.modules_to_not_convert
    if patterns is not None and (not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns)):
        allowed = "a list of module names or fnmatch patterns, e.g. ['lm_head'], or None"
        _fail("modules_to_not_convert", allowed, patterns)
    if not isinstance(config.module_bits, dict):
        _fail("module_bits", "a dict of module name or fnmatch pattern -> bits, e.g. {'*.fc1': 8}", config.module_bits)
    for name, value in config.module_bits.items():
        if not isinstance(name, str) or not name:
            _fail("module_bits", "keyed by module names or fnmatch patterns (non-empty strings)", name)
        bits(f"module_bits[{name!r}]", value)


def weight_format_grid(config: Any) -> Format | None:
    """The grid `config.weight_format` fixes (None: no format), which the config then takes as its weight bits,
    group and symmetry; raises `ValueError` where one of those (or another field) was set otherwise."""
    name = config.weight_format
    if name is None:
        return None
    choice("weight_format", name, list(GGUF_FORMATS), ", or None for hf_qlimit's own grids")
    fmt = GGUF_FORMATS[name]
    clashes = []
    if config.weight_bits not in (4, fmt.bits):  # 4 is the field's default: taken as unset
        clashes.append(f"weight_bits={config.weight_bits} ({name} is {fmt.bits}-bit)")
    if config.group_size not in (None, fmt.group):
        clashes.append(f"group_size={config.group_size} ({name} has blocks of {fmt.group})")
    if config.weight_sym and not fmt.symmetric:
        clashes.append(f"weight_sym=True ({name} is asymmetric)")
    if config.act_bits not in (None, 8):  # 8 is the default
        clashes.append(f"act_bits={config.act_bits} (GGUF stores weights only: act_bits=None)")
    if config.first_last_bits not in (None, *GGUF_FOR_BITS):
        clashes.append(f"first_last_bits={config.first_last_bits} (no GGUF type: one of {sorted(GGUF_FOR_BITS)})")
    module_bits = config.module_bits if isinstance(config.module_bits, dict) else {}
    clashes += [f"module_bits[{k!r}]={v} (no GGUF type)" for k, v in module_bits.items() if v not in GGUF_FOR_BITS]
    if config.bit_candidates is not None:
        clashes.append("bit_candidates (mixed precision is not mapped onto GGUF types yet)")
    if clashes:
        raise ValueError(f"weight_format={name!r} contradicts " + "; ".join(clashes) + ". Drop or change them.")
    if config.act_bits is not None:
        logger.info(f"weight_format={name!r}: GGUF stores weights only, act_bits 8 -> None.")
    return fmt


def calibration(config: Any) -> None:
    choice("method", config.method, (AUTO, *METHODS))
    choice("preset", config.preset, (AUTO, *PRESETS))
    integer("num_samples", config.num_samples, 1, _PRESET_FILLS)
    integer("batch_size", config.batch_size, 1, _PRESET_FILLS)
    integer("iters", config.iters, 0, _PRESET_FILLS)
    integer("max_length", config.max_length, 1, ", or None for no truncation")
    if not _is_int(config.seed):
        _fail("seed", "an integer", config.seed)


def reconstruction(config: Any) -> None:
    number("drop_prob", config.drop_prob, 0, 1, unset=_PRESET_FILLS)
    choice("loss", config.loss, LOSSES, _PRESET_FILLS)
    number("fisher_damping", config.fisher_damping, 0, unset=_PRESET_FILLS)
    choice("rounding", config.rounding, ROUNDINGS, _PRESET_FILLS)
    choice("weight_init", config.weight_init, WEIGHT_INITS, _PRESET_FILLS)
    choice("weight_range", config.weight_range, WEIGHT_RANGES, _PRESET_FILLS)
    flag("gptq_act_order", config.gptq_act_order, _PRESET_FILLS)
    number("init_margin", config.init_margin, 0, 0.5, closed="()", unset=", or None to start at frac(w/s)")
    flag("learn_weight_scale", config.learn_weight_scale, _PRESET_FILLS)
    for name in ("weight_lr", "act_lr", "scale_lr", "round_loss_weight"):
        number(name, getattr(config, name), 0, unset=_PRESET_FILLS)
    beta = config.beta_range
    pair = isinstance(beta, (tuple, list)) and len(beta) == 2 and all(_is_number(b) and b > 0 for b in beta)
    if beta is not None and not pair:
        _fail("beta_range", "two positive numbers (start, end), e.g. (20, 2)" + _PRESET_FILLS, beta)
    number("warmup", config.warmup, 0, 1, closed="[)", unset=_PRESET_FILLS)
    choice("batch_sampling", config.batch_sampling, BATCH_SAMPLINGS, _PRESET_FILLS)


def mixed_precision(config: Any) -> None:
    candidates = config.bit_candidates
    if candidates is not None:
        if not isinstance(candidates, (list, tuple)) or not candidates:
            _fail("bit_candidates", "a non-empty list of bit-widths, e.g. [2, 4, 8], or None", candidates)
        for value in candidates:
            bits("bit_candidates", value)
        if config.avg_bits is None and config.size_budget_bytes is None:
            raise ValueError(
                "Mixed precision (`bit_candidates`) needs a budget: set `avg_bits` or `size_budget_bytes`."
            )
    number("avg_bits", config.avg_bits, 0, closed="(]", unset=", or None")
    integer("size_budget_bytes", config.size_budget_bytes, 1, ", or None")
    number("bops_budget", config.bops_budget, 0, closed="(]", unset=", or None")
    cache = config.sensitivity_cache
    if cache is not None and (not isinstance(cache, str) or not cache):
        _fail("sensitivity_cache", "the path of a JSON file, or None", cache)


def activations(config: Any) -> None:
    if config.transforms is not None:
        if not isinstance(config.transforms, list) or not all(isinstance(t, str) for t in config.transforms):
            allowed = "a list of names, e.g. ['hadamard_inputs'] or ['smoothquant@0.5'], or None"
            _fail("transforms", allowed, config.transforms)
        try:
            check_transforms(config.transforms)
        except ValueError as err:
            raise ValueError(f"`transforms`: {err}") from None
    choice("act_layout", config.act_layout, ACT_LAYOUTS, ", or None (the preset's)")
    bits("prob_bits", config.prob_bits, none="to use act_bits")
    choice("prob_grid", config.prob_grid, PROB_GRIDS, ", or None (the preset's)")
    flag("act_dynamic", config.act_dynamic, ", or None (the preset's)")
    flag("act_fp_first_token", config.act_fp_first_token)


def validate(config: Any) -> None:
    """Raises `ValueError` at the first field holding an impossible value."""
    scheme(config)
    calibration(config)
    reconstruction(config)
    mixed_precision(config)
    activations(config)
