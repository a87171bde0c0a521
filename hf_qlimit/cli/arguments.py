"""`QuantizationArguments`: the command-line flags of the example scripts, mapped onto `QLimitConfig`.

A dataclass for `transformers.HfArgumentParser`, shared by examples/glue/run_glue.py, examples/squad/run_qa.py
and examples/language-modeling/run_ppl.py:

    parser = HfArgumentParser((ModelArguments, DataArguments, QuantizationArguments, TrainingArguments))
    ..., quant_args, training_args = parser.parse_args_into_dataclasses()
    qconfig = quant_args.to_config(seed=training_args.seed, max_length=512)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import transformers

from ..config import QLimitConfig
from ..config_checks import ACT_LAYOUTS, BATCH_SAMPLINGS, LOSSES, PROB_GRIDS, ROUNDINGS, WEIGHT_INITS, WEIGHT_RANGES
from ..presets import AUTO, METHODS, PRESETS
from ..quantizers.formats import GGUF_FORMATS

_FULL_PRECISION = ("none", "fp", "")
_DEFAULT = {f.name: f.default for f in fields(QLimitConfig)}  # a flag's default is its field's
_CONFIG_FIELDS = set(_DEFAULT)


def _one_of(values: tuple[str, ...] | list[str], notes: dict[str, str] | None = None) -> str:
    """The allowed values in a help text ("a, b or c"), from the config's own lists so that they stay in step;
    `notes` adds "(what it does)" after the values it describes."""
    shown = [f"{v} ({notes[v]})" if notes and v in notes else v for v in values]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}"


def parse_bits(name: str, value: Any) -> int | None:
    """Bits given on the command line (or in a JSON file): an integer, or "none" / "fp" / "" for full precision.

    The range (2-8) is checked by `QLimitConfig`; this only turns the text into an int or None.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if str(value).strip().lower() in _FULL_PRECISION:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"--{name} must be an integer from 2 to 8 or 'none', got {value!r}.") from None


def parse_module_bits(value: Any) -> dict[str, int]:
    """`--module_bits` as given: `name=bits` pairs, JSON objects, or (from a .json file) a dict already.

    Names may be fnmatch patterns; the bits (2-8) are checked by `QLimitConfig`.
    """
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in [value] if isinstance(value, str) else value:
        text = str(item).strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--module_bits: {text!r} is not a JSON object ({err.msg}).") from None
            out.update(parsed)
            continue
        name, _, bits = text.rpartition("=")
        if not name or not bits.strip().isdigit():
            raise ValueError(
                f"--module_bits takes name=bits pairs (e.g. '*.fc2=8') or a JSON object ('{{\"*.fc2\": 8}}'), "
                f"got {item!r}."
            )
        out[name] = int(bits)
    return out


_ROUNDING_NOTES = {"anneal": "the papers'", "progressive": "hardens in rounds", "sign": "AutoRound's signed steps"}
_SAMPLING_NOTES = {"fixed": "one length-sorted batch per step", "random": "samples drawn from all batches"}
_LAYOUT_NOTES = {
    "shared": "one quantizer per tensor",
    "block_output": "shared, and post-LN blocks quantize their output for the next block",
}
_PROB_GRID_NOTES = {
    "uniform": "range searched",
    "unit": "fixed to [0, 1]: never clips, rounds the small ones to 0",
    "log2": "powers of 2",
}


@dataclass
class QuantizationArguments:
    """Mapped onto `hf_qlimit.QLimitConfig` by `to_config`; `None` (and `auto`) leaves the preset's value.

    Each flag is the `QLimitConfig` field of the same name (see its docstring), except `--quant_seed` (`seed`) and
    `--size_budget_mb` (`size_budget_bytes`), and `--work_dir`, `--resume`, `--cache_budget_mb`, which are
    arguments of `quantize_qlimit`. `max_length` is an argument of `to_config` (the example's own sequence
    length); `layer_config` and `quant_method` are not set by hand.
    """

    weight_bits: int = field(default=4, metadata={"help": "Weight bits of the transformer blocks (2-8)."})
    act_bits: str = field(default="8", metadata={"help": "Activation bits (2-8), or 'none' for weight-only."})
    method: str = field(
        default=AUTO,
        metadata={
            "help": f"{_one_of([AUTO, *METHODS])}. auto: the preset's (brecq, or qdrop where it drops "
            "activations); qdrop drops at --drop_prob 0.5 unless set."
        },
    )
    preset: str = field(
        default=AUTO,
        metadata={
            "help": f"{_one_of([AUTO, *PRESETS])}: fills every unset field. auto: fast-lm for causal LMs, else fast."
        },
    )
    num_samples: int | None = field(
        default=None, metadata={"help": "Calibration samples (sentences, windows or features); none: the preset's."}
    )
    iters: int | None = field(default=None, metadata={"help": "Reconstruction iterations per block."})
    batch_size: int | None = field(default=None, metadata={"help": "Reconstruction batch size."})
    group_size: int | None = field(
        default=None, metadata={"help": "Input features per weight scale; none: per channel."}
    )
    weight_sym: bool = field(
        default=_DEFAULT["weight_sym"], metadata={"help": "Symmetric weight grids (no zero point)."}
    )
    act_sym: bool = field(default=_DEFAULT["act_sym"], metadata={"help": "Symmetric activation grids."})
    quantize_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Quantize the inputs of the attention matmuls too (true/false, with --act_bits). Default: true, "
            "false for decoder LMs."
        },
    )
    no_quantize_attention: bool = field(default=False, metadata={"help": "The attention matmuls stay in FP."})
    weight_format: str | None = field(
        default=None,
        metadata={
            "help": f"Quantize on a file format's grid so that exporting to it is lossless: {_one_of(list(GGUF_FORMATS))}"
            ". Sets the weight bits, group and symmetry; weights only."
        },
    )
    lp_norm: float = field(
        default=_DEFAULT["lp_norm"], metadata={"help": "p of the Lp error the initial range search minimises."}
    )
    loss: str | None = field(default=None, metadata={"help": f"Reconstruction loss: {_one_of(LOSSES)}."})
    drop_prob: float | None = field(
        default=None,
        metadata={
            "help": "QDrop's probability of keeping FP activations; unset: 0.5 with qdrop. With --method auto, "
            "> 0 runs qdrop and 0 brecq."
        },
    )
    rounding: str | None = field(
        default=None, metadata={"help": f"{_one_of(ROUNDINGS, _ROUNDING_NOTES)}; none: the preset's."}
    )
    learn_weight_scale: bool | None = field(
        default=None, metadata={"help": "Learn the weight steps with the rounding; none: the preset's choice."}
    )
    weight_init: str | None = field(
        default=None, metadata={"help": f"Where the rounding starts: {_one_of(WEIGHT_INITS)}."}
    )
    weight_range: str | None = field(default=None, metadata={"help": f"Initial weight grid: {_one_of(WEIGHT_RANGES)}."})
    gptq_act_order: bool | None = field(
        default=None, metadata={"help": "GPTQ start: round columns by decreasing H diagonal; none: the preset's."}
    )
    init_margin: float | None = field(
        default=None,
        metadata={"help": "GPTQ start: AdaRound's h start this far (0-0.5) from GPTQ's decision; none: the preset's."},
    )
    weight_lr: float | None = field(default=None, metadata={"help": "Adam lr of AdaRound's V; none: the preset's."})
    act_lr: float | None = field(default=None, metadata={"help": "Adam lr of the activation steps (LSQ)."})
    scale_lr: float | None = field(default=None, metadata={"help": "Adam lr of the learned weight steps (log)."})
    round_loss_weight: float | None = field(
        default=None, metadata={"help": "λ of the AdaRound regulariser; none: the preset's."}
    )
    beta_range: list[float] | None = field(
        default=None, metadata={"help": "Start and end of the regulariser's annealed β, e.g. 20 2; none: the preset's."}
    )
    warmup: float | None = field(
        default=None, metadata={"help": "Fraction of the iterations (0-1) before the regulariser starts."}
    )
    fisher_damping: float | None = field(default=None, metadata={"help": "d of loss=fisher's (|g| + d)² weights."})
    batch_sampling: str | None = field(
        default=None,
        metadata={"help": f"Reconstruction mini-batches: {_one_of(BATCH_SAMPLINGS, _SAMPLING_NOTES)}."},
    )
    first_last_bits: str = field(
        default="8", metadata={"help": "Bits of embeddings and the task / LM head, or 'none' for FP."}
    )
    modules_to_not_convert: list[str] | None = field(default=None, metadata={"help": "fnmatch patterns kept in FP."})
    module_bits: list[str] | None = field(
        default=None,
        metadata={
            "help": "Weight bits of single modules: name=bits pairs (fnmatch patterns too), e.g. '*.fc2=8' "
            "lm_head=8, or a JSON object '{\"*.fc2\": 8}'."
        },
    )
    # `--seed` belongs to TrainingArguments; argparse refuses a second one, hence the prefix.
    quant_seed: int | None = field(default=None, metadata={"help": "Seed of calibration sampling; default: --seed."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Folder for progress after every block (and spilled caches)."}
    )
    resume: bool = field(default=False, metadata={"help": "Carry on from the progress in --work_dir."})
    cache_budget_mb: float | None = field(
        default=None, metadata={"help": "RAM for calibration caches (MB); beyond it they spill to --work_dir."}
    )
    bit_candidates: list[int] | None = field(
        default=None, metadata={"help": "Mixed precision: the weight bits a block Linear may get, e.g. 2 4 8."}
    )
    avg_bits: float | None = field(default=None, metadata={"help": "Mixed precision: average weight bits budget."})
    size_budget_mb: float | None = field(
        default=None, metadata={"help": "Mixed precision: budget in MB of the block Linears' packed weights."}
    )
    bops_budget: float | None = field(
        default=None,
        metadata={"help": "Mixed precision: extra budget in bit-operations (weight x activation bits x MACs/token)."},
    )
    sensitivity_cache: str | None = field(
        default=None, metadata={"help": "Mixed precision: file keeping measured sensitivities for other budgets."}
    )
    transforms: list[str] | None = field(
        default=None,
        metadata={
            "help": "Outlier transforms first: smoothquant[@a] os_plus[@a] hadamard_down hadamard_inputs, or none. "
            "Default: hadamard_inputs at --act_bits <= 4 (where the model allows it), else none."
        },
    )
    act_layout: str | None = field(
        default=None,
        metadata={
            "help": f"{_one_of(ACT_LAYOUTS, _LAYOUT_NOTES)}. Default: shared at --act_bits <= 4, else per_linear."
        },
    )
    prob_bits: int | None = field(
        default=None, metadata={"help": "Bits of the attention probabilities; none: --act_bits."}
    )
    prob_grid: str | None = field(
        default=None,
        metadata={
            "help": f"Grid of the attention probabilities: {_one_of(PROB_GRIDS, _PROB_GRID_NOTES)}. "
            "Default: unit for decoder LMs, else uniform."
        },
    )
    act_dynamic: bool | None = field(
        default=None,
        metadata={
            "help": "Dynamic per-token grids for block Linear inputs (true/false). Default: true for decoder LMs."
        },
    )
    act_fp_first_token: bool = field(
        default=False,
        metadata={"help": "Decoders: the token at position 0 (attention sink) skips activation quantization."},
    )

    def quantize_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `quantize_qlimit` beyond the config: work folder, resume, cache budget."""
        budget = None if self.cache_budget_mb is None else int(self.cache_budget_mb * 1e6)
        return {"work_dir": self.work_dir, "resume": self.resume, "cache_budget_bytes": budget}

    def __post_init__(self) -> None:
        # Every value fails at parsing, before any data or model is loaded (from a .json file too), with the
        # config's message naming the field (= the flag); the seed here is a stand-in.
        self.to_config(seed=0)

    def to_config(self, *, seed: int, max_length: int | None = None) -> QLimitConfig:
        """The `QLimitConfig` of these arguments.

        Args:
            seed: the run's seed, used unless `quant_seed` is set.
            max_length: calibration sequences are truncated to this many tokens; `None` keeps
                `QLimitConfig`'s default.

        Raises `ValueError` naming the flag or field whose value is impossible.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _CONFIG_FIELDS}
        values.update(
            act_bits=parse_bits("act_bits", self.act_bits),
            first_last_bits=parse_bits("first_last_bits", self.first_last_bits),
            module_bits=parse_module_bits(self.module_bits),
            seed=self.quant_seed if self.quant_seed is not None else seed,
            size_budget_bytes=None if self.size_budget_mb is None else int(self.size_budget_mb * 1e6),
        )
        if self.no_quantize_attention:
            if self.quantize_attention:
                raise ValueError("--no_quantize_attention and --quantize_attention true contradict: pass one.")
            values["quantize_attention"] = False
        if self.transforms is not None and [t.lower() for t in self.transforms] in (["none"], []):
            values["transforms"] = []  # --transforms none: no transforms, not the preset's
        if max_length is not None:
            values["max_length"] = max_length
        return QLimitConfig(**values)


def parse_arguments(parser: Any, args: list[str] | None = None) -> tuple:
    """An example's dataclasses from `args`, the command line, or a single .json file (transformers' convention)."""
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=args)


def run_environment(device: torch.device | str) -> dict[str, Any]:
    """Where a run ran, for its results.json: tables built later must not guess whether a time is CPU or GPU."""
    device = torch.device(device)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "hf_qlimit": _version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version() -> str:
    """The package version, with the git commit when it runs from its own checkout ('.dirty' when edited)."""
    from .. import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", root, *args], check=False, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        # an installed copy may sit inside some other repository (a venv in a project): not ours
        if os.path.realpath(git("rev-parse", "--show-toplevel") or "/nonexistent") != os.path.realpath(root):
            return __version__
        dirty = ".dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        return f"{__version__}+g{git('rev-parse', '--short', 'HEAD')}{dirty}"
    except (OSError, subprocess.SubprocessError):  # no git
        return __version__
