"""`hf-qlimit quantize MODEL --calib TEXT --output DIR`: the whole job in one command.

Loads MODEL (a Hub id or a folder), quantizes it on windows of the calibration text, saves the hf_qlimit
checkpoint (with the tokenizer) to --output, optionally exports it (GGUF for llama.cpp, compressed-tensors for
vLLM-style servers), measures the perplexity before and after on held-out windows (causal LMs), and writes a
summary (printed, and quantize_summary.json) and a model card (README.md) into the output folder.

Weights only by default (--act_bits none): the targets are llama.cpp and vLLM-style weight-only kernels; pass
--act_bits 8 for W4A8. Every QLimitConfig field is a flag (--method, --iters, --num_samples, ...); --bits,
--group-size and --format are short names of --weight_bits, --group_size and --weight_format.
"""

from __future__ import annotations

import argparse
import logging as pylogging
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from transformers.utils import logging

from ..config import QLimitConfig
from ..export import FORMATS, ExportError, export
from ..export.common import copy_tokenizer
from ..models import get_adapter, is_causal_lm
from ..quantizers.formats import GGUF_FOR_BITS, has_offsets, is_gguf
from .arguments import QuantizationArguments, run_environment
from .model_card import non_default_settings, summary_text, write_model_card, write_summary
from .sizes import export_info, folder_bytes, source_size
from .text_data import TextSource, TextWindows, UsageError, build_windows, perplexity

# Named, not __name__: under `python -m` that is "__main__", outside the hf_qlimit loggers transformers' handler prints.
logger = logging.get_logger("hf_qlimit.cli.quantize")
USAGE = """hf-qlimit quantize MODEL --calib FILE_OR_DATASET --output DIR
       [--bits N] [--group-size N | --format gguf:q4_0] [--export gguf|compressed-tensors]
       [--eval FILE] [--eval-windows N] [--method rtn] [any QLimitConfig flag...]"""
_BASE = {f.name: f for f in fields(QuantizationArguments)}


def _aliased(name: str, alias: str, default: Any) -> Any:
    """`QuantizationArguments`' field `name` (its help text) with a short flag `alias` too."""
    return field(default=default, metadata={**_BASE[name].metadata, "aliases": [alias]})


@dataclass
class QuantizeArguments(QuantizationArguments):
    """`QuantizationArguments` with short names, weights only by default, and the run's seed."""

    weight_bits: int = _aliased("weight_bits", "--bits", 4)
    act_bits: str = field(
        default="none",
        metadata={"help": "Activation bits (2-8), or 'none': weights only, the default here (llama.cpp / vLLM)."},
    )
    weight_format: str | None = _aliased("weight_format", "--format", None)
    seed: int = field(default=0, metadata={"help": "Seed of quantization (and of the preset's sampling)."})


@dataclass
class RunArguments:
    calib: str = field(
        metadata={"help": "Calibration text: a text file, a dataset folder or data file, or a Hub dataset name."}
    )
    output: str = field(metadata={"help": "Folder the quantized checkpoint, summary and model card are written to."})
    calib_config: str | None = field(default=None, metadata={"help": "Dataset configuration (e.g. wikitext-2-raw-v1)."})
    calib_split: str = field(default="train", metadata={"help": "Dataset split of the calibration text."})
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the text."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per window (capped at the model's context)."})
    eval: str | None = field(
        default=None,
        metadata={"help": "Perplexity text (file or dataset); default: the windows after the calibration ones."},
    )
    eval_split: str = field(default="test", metadata={"help": "Dataset split of --eval."})
    eval_windows: int = field(default=8, metadata={"help": "Windows of --seq_len tokens for perplexity; 0: skip it."})
    export: str | None = field(
        default=None,
        metadata={"help": "Also export the checkpoint (GGUF: causal LMs, weights only).", "choices": FORMATS},
    )
    export_dir: str | None = field(default=None, metadata={"help": "Where the export goes; default OUTPUT/FORMAT."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default cuda when available."})
    dtype: str = field(default="float32", metadata={"help": "Dtype the model is loaded and quantized in."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with code on the Hub."})


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (RunArguments, QuantizeArguments),
        prog="hf-qlimit quantize",
        usage=USAGE,
        description=__doc__,
        formatter_class=_Formatter,
    )
    parser.add_argument("model", help="Hub id or local folder of the full-precision model.")
    return parser


@dataclass
class Job:
    """Everything checked and prepared before the model's weights are loaded."""

    model: str
    run: RunArguments
    quant: QuantizeArguments
    model_config: Any
    causal: bool
    config: QLimitConfig  # as given
    resolved: QLimitConfig  # with the preset's choices, what runs
    tokenizer: Any
    data: TextWindows
    device: torch.device


def parse(argv: list[str]) -> tuple[str, RunArguments, QuantizeArguments]:
    """(MODEL, run arguments, quantization arguments); an impossible value raises `UsageError`."""
    try:
        run, quant, extra = build_parser().parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # QuantizationArguments checks every value against QLimitConfig while parsing
        raise UsageError(str(err)) from None
    return extra.model, run, quant


def check_export(run: RunArguments, model_config: Any, causal: bool, config: QLimitConfig) -> None:
    """Refuses an export (or a GGUF weight format) the model cannot take, before any work."""
    gguf = run.export == "gguf" or is_gguf(config.weight_format)
    if gguf and not causal:
        raise UsageError(
            f"GGUF (--format {config.weight_format} / --export gguf) holds causal LMs for llama.cpp; "
            f"{model_config.model_type!r} is not one. Drop --format and --export gguf (--bits / --group-size "
            "set the grid, --export compressed-tensors exports it)."
        )
    if run.export == "compressed-tensors" and is_gguf(config.weight_format):
        # the embedding, head and module_bits entries take the GGUF type of their bits (formats.GGUF_FOR_BITS)
        bits = {config.weight_bits, config.first_last_bits, *config.module_bits.values()} - {None}
        offsets = sorted({f for f in {config.weight_format, *map(GGUF_FOR_BITS.get, bits)} if has_offsets(f)})
        if offsets:
            raise UsageError(
                f"{', '.join(offsets)} add a float offset per sub-block, which compressed-tensors cannot store. "
                "Use --export gguf, or a format without offsets (gguf:q4_0, q4_1, q5_1, q3_k, q6_k ...) and no "
                "2-bit --first_last_bits / --module_bits."
            )
    if run.export == "compressed-tensors" and config.transforms:
        raise UsageError(
            f"--export compressed-tensors cannot hold the input rotations {config.transforms} (the default for "
            "decoder LMs with activations, and at 4-bit activations). Pass --transforms none to export."
        )
    if run.export == "gguf" and config.act_bits is not None:
        raise UsageError(
            f"--export gguf stores weights only; --act_bits {config.act_bits} quantizes activations. "
            "Pass --act_bits none."
        )
    if run.export == "gguf" and not is_gguf(config.weight_format):
        logger.warning(
            "--export gguf without --format gguf:*: Linears whose grid is no GGUF type are written as "
            "float32. --format gguf:q4_0 (or q4_1, q8_0) quantizes on the file's own grid."
        )


def check_gguf_export(model_config: Any, tokenizer: Any) -> None:
    """The GGUF exporter's own checks of the architecture and the tokenizer, run on a writer that writes nothing,
    so that a model llama.cpp cannot take is refused before quantization."""
    try:
        import gguf
    except ImportError:
        raise UsageError("--export gguf needs the `gguf` package: pip install gguf (or hf_qlimit[examples]).") from None
    from ..export.gguf_metadata import family_of
    from ..export.gguf_tokenizer import add_tokenizer

    try:
        family_of(model_config)
        add_tokenizer(gguf.GGUFWriter(None, "llama"), tokenizer, model_config.vocab_size)
    except ExportError as err:
        raise UsageError(f"--export gguf: {err}") from None


def prepare(model: str, run: RunArguments, quant: QuantizeArguments) -> Job:
    """Reads the model's config and tokenizer and the text; every bad input raises `UsageError` here."""
    source = TextSource(run.calib, run.calib_config, run.calib_split, run.text_column)
    eval_source = None if run.eval is None else TextSource(run.eval, run.calib_config, run.eval_split, run.text_column)
    for src in (source, eval_source):
        _ = src and src.kind  # a missing local file fails now
    if Path(run.output).expanduser().resolve() == Path(model).expanduser().resolve():
        raise UsageError(f"--output {run.output!r} is the model's own folder; choose another folder.")
    if run.eval_windows < 0 or run.seq_len < 2:
        raise UsageError("--eval_windows must be >= 0 and --seq_len >= 2.")
    if not hasattr(torch, run.dtype):
        raise UsageError(f"--dtype {run.dtype!r} is no torch dtype (float32, bfloat16, float16).")
    common = {"trust_remote_code": run.trust_remote_code}
    try:
        model_config = AutoConfig.from_pretrained(model, **common)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"Cannot read a model config from {model!r}: {err} Pass a Hub id or a folder holding config.json."
        ) from None
    causal = is_causal_lm(SimpleNamespace(config=model_config))
    seq_len = min(run.seq_len, getattr(model_config, "max_position_embeddings", None) or run.seq_len)
    config = quant.to_config(seed=quant.seed, max_length=seq_len)
    resolved = config.resolved(causal_lm=causal)
    check_export(run, model_config, causal, resolved)
    tokenizer = AutoTokenizer.from_pretrained(model, **common)
    if run.export == "gguf":
        check_gguf_export(model_config, tokenizer)
    num_eval = run.eval_windows if causal else 0
    data = build_windows(tokenizer, source, eval_source, seq_len, resolved.num_samples, num_eval)
    device = torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Job(model, run, quant, model_config, causal, config, resolved, tokenizer, data, device)


def model_class(job: Job) -> type:
    """The class the checkpoint names (BertForSequenceClassification...), AutoModelForCausalLM for causal LMs."""
    if job.causal:
        return AutoModelForCausalLM
    names = getattr(job.model_config, "architectures", None) or []
    return (getattr(transformers, names[0], None) if names else None) or AutoModel


def check_group_size(model: Any, config: QLimitConfig) -> None:
    """`group_size` must divide the input features of every quantized Linear: said before any work."""
    if config.group_size is None:
        return
    try:
        plan = get_adapter(model).layer_config(model, config)
    except ValueError as err:  # a weight_format's blocks that do not fit a module
        raise UsageError(f"--format {config.weight_format}: {err}") from None
    for name, spec in plan.items():
        features = getattr(model.get_submodule(name), "in_features", None)
        if spec["kind"] == "linear" and features and features > config.group_size and features % config.group_size:
            raise UsageError(
                f"--group_size {config.group_size} does not divide the {features} input features of {name!r}; "
                "choose a divisor (e.g. 64 for 576), or no --group_size for per-channel scales."
            )


def copy_tokenizer_files(model: str, out: Path) -> None:
    """Tokenizer files of a local model folder that `save_pretrained` did not write, e.g. `tokenizer.gguf` (the
    source GGUF's tokenizer keys, which GGUF export then copies as they were instead of rebuilding them)."""
    source = Path(model).expanduser()
    if source.is_dir():
        copy_tokenizer(source, out, overwrite=False)


def _eval(model: Any, job: Job, name: str, timings: dict[str, float]) -> dict[str, float] | None:
    if not job.data.eval.shape[0]:
        return None
    tick = time.perf_counter()
    result = perplexity(model, job.data.eval, job.device, f"perplexity {name}")
    timings[f"{name}_eval_s"] = time.perf_counter() - tick
    return result


def run_job(job: Job, start: float) -> dict[str, Any]:
    """Load, evaluate, quantize, save, export, reload, evaluate; returns the summary (`start`: when the command
    started, for the total time)."""
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    out = Path(job.run.output)
    cls = model_class(job)
    logger.info(f"Loading {job.model} ({cls.__name__})")
    model = cls.from_pretrained(
        job.model, dtype=getattr(torch, job.run.dtype), trust_remote_code=job.run.trust_remote_code
    )
    check_group_size(model, job.resolved)
    source = source_size(job.model, model)
    timings["load_s"] = time.perf_counter() - tick
    model.to(job.device)
    fp = _eval(model, job, "fp", timings)

    tick = time.perf_counter()
    model.quantize_qlimit(job.data.calib, job.config, device=job.device, **job.quant.quantize_kwargs())
    timings["quantize_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    model.save_pretrained(out)
    job.tokenizer.save_pretrained(out)
    copy_tokenizer_files(job.model, out)
    timings["save_s"] = time.perf_counter() - tick
    saved_bytes = folder_bytes(out)
    del model  # what is measured next is what was written to disk

    exported = None
    if job.run.export:
        tick = time.perf_counter()
        written = export(out, Path(job.run.export_dir or out / job.run.export), format=job.run.export)
        timings["export_s"] = time.perf_counter() - tick
        exported = export_info(job.run.export, written)
    reloaded = cls.from_pretrained(out).to(job.device)
    quantized = _eval(reloaded, job, "quantized", timings)
    timings["total_s"] = time.perf_counter() - start
    return _summary(job, fp, quantized, source, saved_bytes, exported, timings)


def _summary(job: Job, fp: Any, quantized: Any, source: tuple, saved: int, exported: Any, timings: dict) -> dict:
    if not job.causal:
        ppl = {"skipped": f"{job.model_config.model_type!r} is not a causal LM"}
    elif fp is None:
        ppl = {"skipped": "--eval_windows 0"}
    else:
        ppl = {"fp": fp, "quantized": quantized}
    return {
        "model": job.model,
        "model_type": job.model_config.model_type,
        "output": str(job.run.output),
        "config_summary": job.resolved.summary(),
        "settings": non_default_settings(job.config),
        "resolved_config": {k: v for k, v in job.resolved.to_dict().items() if k != "layer_config"},
        "data": job.data.describe(),
        "perplexity": ppl,
        "sizes": {
            "source_bytes": source[0],
            "source_basis": source[1],
            "saved_bytes": saved,
            "export_bytes": exported["bytes"] if exported else None,
        },
        "export": exported,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "environment": run_environment(job.device),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns 0, or 2 (with the message on stderr) for bad input found before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    qlimit_logger = pylogging.getLogger("hf_qlimit")
    level = qlimit_logger.level
    qlimit_logger.setLevel(pylogging.INFO)  # the pipeline's progress; transformers' own logs stay at their level
    start = time.perf_counter()
    try:
        job = prepare(*parse(argv))
        summary = run_job(job, start)
    except UsageError as err:
        print(f"hf-qlimit quantize: error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:  # after quantization: the checkpoint is saved, the export is not
        print(
            f"hf-qlimit quantize: export failed: {err}\nThe quantized checkpoint is saved in {job.run.output}; once "
            f"fixed, export it with: hf-qlimit export {job.run.output} OUT_DIR --format {job.run.export}",
            file=sys.stderr,
        )
        return 1
    finally:
        qlimit_logger.setLevel(level)
    out = Path(job.run.output)
    write_summary(summary, out)
    write_model_card(summary, model_class(job).__name__, out)
    print(summary_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
