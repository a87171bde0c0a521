"""`QuantizationArguments`: the command-line flags of the example scripts, mapped onto `QLimitConfig`.

A dataclass for `transformers.HfArgumentParser`, shared by examples/glue/run_glue.py, examples/squad/run_qa.py
and examples/language-modeling/run_ppl.py:

    parser = HfArgumentParser((ModelArguments, DataArguments, QuantizationArguments, TrainingArguments))
    ..., quant_args, training_args = parser.parse_args_into_dataclasses()
    qconfig = quant_args.to_config(seed=training_args.seed, max_length=512)
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from ..config import AUTO, LOSSES, METHODS, PRESETS, PROB_GRIDS, WEIGHT_INITS, WEIGHT_RANGES, QLimitConfig

_FULL_PRECISION = ("none", "fp", "")


def _one_of(values: tuple[str, ...] | list[str]) -> str:
    """The allowed values in a help text ("a, b or c"), from the config's own lists so that they stay in step."""
    return ", ".join(values[:-1]) + f" or {values[-1]}"


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


@dataclass
class QuantizationArguments:
    """Mapped onto `hf_qlimit.QLimitConfig` by `to_config`; `None` (and `auto`) leaves the preset's value.

    Each flag is the `QLimitConfig` field of the same name (see its docstring), except `--quant_seed` (`seed`) and
    `--size_budget_mb` (`size_budget_bytes`), and `--work_dir`, `--resume`, `--cache_budget_mb`, which are
    arguments of `quantize_qlimit`.
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
    loss: str | None = field(default=None, metadata={"help": f"Reconstruction loss: {_one_of(LOSSES)}."})
    drop_prob: float | None = field(
        default=None,
        metadata={
            "help": "QDrop's probability of keeping FP activations; unset: 0.5 with qdrop. With --method auto, "
            "> 0 runs qdrop and 0 brecq."
        },
    )
    rounding: str | None = field(
        default=None,
        metadata={
            "help": "anneal (the papers'), progressive (hardens in rounds) or sign (AutoRound's signed steps); "
            "none: the preset's."
        },
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
    weight_lr: float | None = field(default=None, metadata={"help": "Adam lr of AdaRound's V; none: the preset's."})
    act_lr: float | None = field(default=None, metadata={"help": "Adam lr of the activation steps (LSQ)."})
    scale_lr: float | None = field(default=None, metadata={"help": "Adam lr of the learned weight steps (log)."})
    fisher_damping: float | None = field(default=None, metadata={"help": "d of loss=fisher's (|g| + d)² weights."})
    batch_sampling: str | None = field(
        default=None,
        metadata={"help": "Reconstruction mini-batches: random (samples from all batches) or fixed."},
    )
    first_last_bits: str = field(
        default="8", metadata={"help": "Bits of embeddings and the task / LM head, or 'none' for FP."}
    )
    modules_to_not_convert: list[str] | None = field(default=None, metadata={"help": "fnmatch patterns kept in FP."})
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
    sensitivity_cache: str | None = field(
        default=None, metadata={"help": "Mixed precision: file keeping measured sensitivities for other budgets."}
    )
    transforms: list[str] | None = field(
        default=None,
        metadata={"help": "Outlier transforms first: smoothquant[@a] os_plus[@a] hadamard_down hadamard_inputs."},
    )
    act_layout: str = field(
        default="per_linear",
        metadata={
            "help": "per_linear, shared (one quantizer per tensor) or block_output (shared, and post-LN blocks "
            "quantize their output for the next block)."
        },
    )
    prob_bits: int | None = field(
        default=None, metadata={"help": "Bits of the attention probabilities; none: --act_bits."}
    )
    prob_grid: str = field(
        default="uniform",
        metadata={"help": f"Grid of the attention probabilities: {_one_of(PROB_GRIDS)}."},
    )
    act_dynamic: bool = field(default=False, metadata={"help": "Dynamic per-token grids for block Linear inputs."})
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
        extra = {} if max_length is None else {"max_length": max_length}
        return QLimitConfig(
            weight_bits=self.weight_bits,
            act_bits=parse_bits("act_bits", self.act_bits),
            method=self.method,
            preset=self.preset,
            num_samples=self.num_samples,
            iters=self.iters,
            batch_size=self.batch_size,
            group_size=self.group_size,
            loss=self.loss,
            drop_prob=self.drop_prob,
            rounding=self.rounding,
            learn_weight_scale=self.learn_weight_scale,
            weight_init=self.weight_init,
            weight_range=self.weight_range,
            gptq_act_order=self.gptq_act_order,
            weight_lr=self.weight_lr,
            act_lr=self.act_lr,
            scale_lr=self.scale_lr,
            fisher_damping=self.fisher_damping,
            batch_sampling=self.batch_sampling,
            first_last_bits=parse_bits("first_last_bits", self.first_last_bits),
            modules_to_not_convert=self.modules_to_not_convert,
            seed=self.quant_seed if self.quant_seed is not None else seed,
            bit_candidates=self.bit_candidates,
            avg_bits=self.avg_bits,
            size_budget_bytes=None if self.size_budget_mb is None else int(self.size_budget_mb * 1e6),
            sensitivity_cache=self.sensitivity_cache,
            transforms=self.transforms,
            act_layout=self.act_layout,
            prob_bits=self.prob_bits,
            prob_grid=self.prob_grid,
            act_dynamic=self.act_dynamic,
            act_fp_first_token=self.act_fp_first_token,
            **extra,
        )


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
