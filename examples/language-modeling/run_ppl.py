#!/usr/bin/env python
"""Quantize a decoder LM (OPT, Llama, Qwen2, Mistral) with hf_qlimit and measure its perplexity.

Perplexity follows the GPTQ protocol: the evaluation texts are joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped), and the perplexity is
exp(mean NLL) over every predicted token (all but the first of each window). Calibration takes `num_calib_samples`
random windows of `seq_len` tokens from the calibration text, drawn with `--seed`.

The FP model is evaluated, quantized, saved to `--output_dir`, reloaded from disk with `from_pretrained` and
evaluated again; `results.json` is written there and a one-line summary printed.

    # online: WikiText-2 (raw) from the Hub, as in the GPTQ paper
    python examples/language-modeling/run_ppl.py --model_name_or_path facebook/opt-125m \
        --method rtn --weight_bits 4 --act_bits none --output_dir out/opt125m-rtn-w4
    # offline: local text files (one paragraph per line, WikiText layout)
    python examples/language-modeling/run_ppl.py --model_name_or_path smollm2-135m-instruct-q4_1 \
        --eval_file ../shared/data/wikitext-2/test.txt --calib_file ../shared/data/wikitext-2/valid.txt \
        --seq_len 512 --method qdrop --weight_bits 4 --act_bits 8 --output_dir out/smollm2-w4a8
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel
from transformers.utils import logging as hf_logging

from hf_qlimit.cli.arguments import QuantizationArguments, parse_arguments, run_environment
from hf_qlimit.cli.quantize import check_group_size, copy_tokenizer_files
from hf_qlimit.cli.text_data import perplexity as text_perplexity
from hf_qlimit.cli.text_data import read_text_file

logger = hf_logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or folder of the model (or of the GGUF file)."})
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside model_name_or_path, dequantized to FP."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    dtype: str = field(default="float32", metadata={"help": "Dtype the FP model is loaded and quantized in."})
    device_map: str | None = field(
        default=None, metadata={"help": "accelerate device_map (auto, cpu, disk): quantize a model larger than memory."}
    )
    offload_folder: str | None = field(default=None, metadata={"help": "Where accelerate offloads weights to disk."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are stored."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with code on the Hub."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset; default Salesforce/wikitext without --eval_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Default wikitext-2-raw-v1 for WikiText."})
    eval_split: str = field(default="test", metadata={"help": "Hub split whose perplexity is measured."})
    calib_split: str = field(default="train", metadata={"help": "Hub split the calibration windows come from."})
    text_column: str = field(default="text", metadata={"help": "Column of the Hub dataset holding the text."})
    eval_file: str | None = field(default=None, metadata={"help": "Local text file to evaluate (one text a line)."})
    calib_file: str | None = field(default=None, metadata={"help": "Local text file of calibration text."})
    seq_len: int | None = field(default=None, metadata={"help": "Window length; default: the model's context."})
    num_calib_samples: int | None = field(
        default=None, metadata={"help": "Calibration windows; default: the preset's."}
    )
    max_eval_windows: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N windows (quick runs)."}
    )

    def __post_init__(self) -> None:
        if self.eval_file is None and self.dataset_name is None:
            self.dataset_name = "Salesforce/wikitext"  # the Hub's "wikitext" (parquet, no loading script)
        if self.dataset_name in ("wikitext", "Salesforce/wikitext") and self.dataset_config_name is None:
            self.dataset_config_name = "wikitext-2-raw-v1"
        if self.eval_file is not None and self.dataset_name is not None:
            raise ValueError("Pass either --eval_file (local text) or --dataset_name (Hub), not both.")


@dataclass
class LMQuantizationArguments(QuantizationArguments):
    """`hf_qlimit.QuantizationArguments`, weight-only by default, with the run's `--seed` (no TrainingArguments)."""

    act_bits: str = field(default="none", metadata={"help": "Activation bits (2-8), or 'none' for weight-only."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration windows and of reconstruction."})


@dataclass
class RunArguments:
    output_dir: str = field(metadata={"help": "Where the quantized model and results.json are written."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default cuda when available."})
    eval_batch_size: int = field(default=1, metadata={"help": "Windows per forward pass when evaluating."})
    skip_fp_eval: bool = field(default=False, metadata={"help": "Do not evaluate the FP model (saves a pass)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (torch.set_num_threads)."})


def load_texts(data_args: DataArguments, split: str, cache_dir: str | None) -> list[str]:
    """The texts of the evaluation ("eval") or calibration ("calib") data."""
    local = data_args.eval_file if split == "eval" else data_args.calib_file
    if local is not None:
        return read_text_file(local)
    if data_args.dataset_name is None:  # local evaluation file but no calibration file
        logger.warning(
            "No --calib_file: calibrating on the evaluation text, so the quantized perplexity is optimistic."
        )
        return read_text_file(data_args.eval_file)
    import datasets

    hub_split = data_args.eval_split if split == "eval" else data_args.calib_split
    ds = datasets.load_dataset(
        data_args.dataset_name, data_args.dataset_config_name, split=hub_split, cache_dir=cache_dir
    )
    return list(ds[data_args.text_column])


def tokenize_corpus(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts joined with "\\n\\n" and tokenized once, as GPTQ does: a 1-D tensor of token ids."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise ValueError("The text is empty.")
    return ids


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, seq_len) non-overlapping windows; the tail shorter than `seq_len` is dropped."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}.")
    return ids[: n * seq_len].reshape(n, seq_len)


def calibration_windows(ids: torch.Tensor, seq_len: int, num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`num` windows of `seq_len` tokens at seeded random offsets (GPTQ's sampling)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"The calibration text has {ids.numel()} tokens; it needs more than seq_len={seq_len}.")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(num)]
    return [{"input_ids": ids[s : s + seq_len].clone()} for s in starts]


def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, float]:
    """exp(mean NLL) over every predicted token of every window: `hf-qlimit quantize`'s own measure."""
    return text_perplexity(model, windows, device, "perplexity", batch_size)


def build_qlimit_config(quant_args: LMQuantizationArguments, num_calib_samples: int | None, seq_len: int):
    """The `QLimitConfig`; `--num_calib_samples` is another name of `--num_samples`."""
    num_samples = quant_args.num_samples
    if num_calib_samples is not None and num_samples is not None and num_calib_samples != num_samples:
        raise ValueError(f"--num_calib_samples {num_calib_samples} and --num_samples {num_samples} disagree; pass one.")
    if num_calib_samples is not None:
        quant_args = replace(quant_args, num_samples=num_calib_samples)
    return quant_args.to_config(seed=quant_args.seed, max_length=seq_len)


def load_model_and_tokenizer(model_args: ModelArguments) -> tuple[PreTrainedModel, Any, dict | None]:
    """(FP model, tokenizer, GGUF provenance or None). A GGUF file is dequantized into a plain FP model."""
    dtype = getattr(torch, model_args.dtype)
    common = {"cache_dir": model_args.cache_dir, "trust_remote_code": model_args.trust_remote_code}
    if model_args.gguf_file is not None:
        from hf_qlimit.cli.gguf_to_hf import load_gguf_as_float

        path = Path(model_args.model_name_or_path) / model_args.gguf_file
        if not path.is_file():  # a Hub repository holding the GGUF file
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_args.model_name_or_path, model_args.gguf_file, cache_dir=model_args.cache_dir)
        model, tokenizer, source = load_gguf_as_float(path)
        if model_args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **common)
        return model.to(dtype), tokenizer, source
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **common)
    # dtype explicitly: transformers 5 loads the checkpoint's dtype by default (fp16 for OPT on the Hub).
    placement = {}
    if model_args.device_map is not None:  # "disk" alone is not a device_map value: everything on disk
        device_map = {"": "disk"} if model_args.device_map == "disk" else model_args.device_map
        placement = {"device_map": device_map, "offload_folder": model_args.offload_folder}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, **placement, **common)
    source_file = Path(model_args.model_name_or_path) / "gguf_source.json"  # a folder made by hf_qlimit.cli.gguf_to_hf
    return model, tokenizer, json.loads(source_file.read_text()) if source_file.is_file() else None


def _summary(results: dict[str, Any]) -> str:
    q = results["qlimit_config"]
    bits = f"W{q['weight_bits']}A{q['act_bits'] or 16}" + (f" g{q['group_size']}" if q["group_size"] else "")
    fp, qp = results["fp"], results["quantized"]
    ppl = (
        f"ppl Q {qp['ppl']:.3f}"
        if fp is None
        else f"ppl FP {fp['ppl']:.3f} -> Q {qp['ppl']:.3f} ({qp['ppl'] - fp['ppl']:+.3f})"
    )
    data = results["data"]
    return (
        f"{data['eval']} | {q['method']} {bits} | seq_len {data['seq_len']}, {qp['windows']} windows, "
        f"{qp['tokens']} tokens | {ppl} | quantized in {results['timings_s']['quantize_s']:.1f}s"
    )


def _setup_logging() -> None:
    logging.basicConfig(  # no-op where a handler exists already (pytest, a calling script)
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO)


@dataclass
class LMData:
    """The token windows of a run: evaluation windows (from `eval_tokens` tokens) and calibration samples."""

    seq_len: int
    eval_tokens: int
    windows: torch.Tensor
    calib: list[dict[str, torch.Tensor]]


def parse(args: list[str] | None) -> tuple[ModelArguments, DataArguments, LMQuantizationArguments, RunArguments]:
    """The four argument dataclasses, from `args`, the command line or a .json file; sets up logging and threads."""
    parser = HfArgumentParser((ModelArguments, DataArguments, LMQuantizationArguments, RunArguments))
    model_args, data_args, quant_args, run_args = parse_arguments(parser, args)
    _setup_logging()
    if run_args.num_threads:
        torch.set_num_threads(run_args.num_threads)
    return model_args, data_args, quant_args, run_args


def prepare(
    model: PreTrainedModel,
    tokenizer: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    quant_args: LMQuantizationArguments,
) -> tuple[Any, LMData]:
    """The resolved `QLimitConfig` (checked against the model) and the evaluation and calibration windows."""
    seq_len = data_args.seq_len or model.config.max_position_embeddings
    qconfig = build_qlimit_config(quant_args, data_args.num_calib_samples, seq_len).for_model(model)
    check_group_size(model, qconfig)
    eval_ids = tokenize_corpus(tokenizer, load_texts(data_args, "eval", model_args.cache_dir))
    windows = eval_windows(eval_ids, seq_len, data_args.max_eval_windows)
    calib_ids = tokenize_corpus(tokenizer, load_texts(data_args, "calib", model_args.cache_dir))
    calib = calibration_windows(calib_ids, seq_len, qconfig.num_samples, qconfig.seed)
    logger.info(
        f"{eval_ids.numel()} evaluation tokens -> {windows.shape[0]} windows of {seq_len}; "
        f"{len(calib)} calibration windows"
    )
    return qconfig, LMData(seq_len, eval_ids.numel(), windows, calib)


def quantize_and_save(
    model: PreTrainedModel,
    tokenizer: Any,
    data: LMData,
    qconfig: Any,
    quant_args: LMQuantizationArguments,
    device: torch.device,
    output_dir: Path,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Quantizes `model` in place (`timings["quantize_s"]`) and saves it with its tokenizer; returns the settings
    for results.json (the config as resolved before quantization, with the bits mixed precision chose)."""
    quant_settings = qconfig.to_dict()
    quant_settings.pop("layer_config", None)  # filled by quantization: per-module detail, not a setting
    tick = time.perf_counter()
    model.quantize_qlimit(data.calib, qconfig, device=device, **quant_args.quantize_kwargs())
    timings["quantize_s"] = time.perf_counter() - tick
    quant_settings["module_bits"] = model.config.quantization_config.module_bits  # mixed precision's choice
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    copy_tokenizer_files(model.name_or_path, Path(output_dir))  # e.g. a GGUF source's tokenizer.gguf
    return quant_settings


def data_description(data_args: DataArguments, data: LMData) -> dict[str, Any]:
    """The "data" entry of results.json: the sources, the window length and how many windows."""
    hub = f"hub:{data_args.dataset_name}/{data_args.dataset_config_name}"
    return {
        "eval": data_args.eval_file or f"{hub}:{data_args.eval_split}",
        "calib": data_args.calib_file or data_args.eval_file or f"{hub}:{data_args.calib_split}",
        "seq_len": data.seq_len,
        "eval_tokens_total": data.eval_tokens,
        "max_eval_windows": data_args.max_eval_windows,
        "calib_windows": len(data.calib),
    }


def main(args: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, quant_args, run_args = parse(args)
    output_dir = Path(run_args.output_dir)
    device = torch.device(run_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    timings: dict[str, float] = {}

    model, tokenizer, gguf_source = load_model_and_tokenizer(model_args)
    qconfig, data = prepare(model, tokenizer, model_args, data_args, quant_args)
    if model_args.device_map is None:  # a dispatched model stays where accelerate put it
        model.to(device)

    fp = None
    if not run_args.skip_fp_eval:
        tick = time.perf_counter()
        fp = perplexity(model, data.windows, run_args.eval_batch_size, device)
        timings["fp_eval_s"] = time.perf_counter() - tick
        logger.info(f"FP perplexity {fp['ppl']:.4f}")

    quant_settings = quantize_and_save(model, tokenizer, data, qconfig, quant_args, device, output_dir, timings)
    del model  # what is evaluated next is only what was written to disk

    tick = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).to(device)
    timings["load_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    quantized = perplexity(reloaded, data.windows, run_args.eval_batch_size, device)
    timings["quantized_eval_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    logger.info(f"Quantized perplexity {quantized['ppl']:.4f}")

    results = {
        "model_name_or_path": model_args.model_name_or_path,
        "gguf_source": gguf_source,
        "data": data_description(data_args, data),
        "fp": fp,
        "quantized": quantized,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "qlimit_config": quant_settings,
        "run": asdict(run_args),
        "environment": run_environment(device),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(_summary(results))
    return results


if __name__ == "__main__":
    main()
