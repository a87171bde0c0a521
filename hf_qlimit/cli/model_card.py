"""What `hf-qlimit quantize` leaves beside the checkpoint: the summary (printed, and saved as JSON) and a model
card (README.md) with the settings, the measured figures and how to load or run the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import QLimitConfig

SUMMARY_FILE = "quantize_summary.json"
CARD_FILE = "README.md"
_NOT_SETTINGS = ("layer_config", "quant_method")  # filled by quantization / fixed: not a user's choice


def non_default_settings(config: QLimitConfig) -> dict[str, Any]:
    """The fields of `config` (as given, before the preset fills it) that differ from `QLimitConfig()`'s."""
    chosen = config.non_default(skip=_NOT_SETTINGS)
    return {name: list(value) if isinstance(value, tuple) else value for name, value in chosen.items()}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def perplexity_line(summary: dict[str, Any]) -> str:
    ppl = summary["perplexity"]
    if ppl.get("skipped"):
        return f"skipped: {ppl['skipped']}"
    fp, q = ppl["fp"]["ppl"], ppl["quantized"]["ppl"]
    data = summary["data"]
    return (
        f"FP {fp:.3f} -> quantized {q:.3f} ({q - fp:+.3f}, {100 * (q / fp - 1):+.1f}%) on {data['eval_windows']} "
        f"windows of {data['seq_len']} tokens ({data['eval']})"
    )


def size_line(summary: dict[str, Any]) -> str:
    sizes = summary["sizes"]
    line = f"source {human_bytes(sizes['source_bytes'])} ({sizes['source_basis']}) -> saved "
    line += human_bytes(sizes["saved_bytes"])
    if sizes["source_bytes"] and sizes["saved_bytes"]:
        line += f" ({sizes['source_bytes'] / sizes['saved_bytes']:.1f}x smaller)"
    if sizes.get("export_bytes") is not None:
        line += f"; {summary['export']['format']} export {human_bytes(sizes['export_bytes'])}"
    return line


def summary_text(summary: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    t = summary["timings_s"]
    lines = [
        f"hf-qlimit quantize: {summary['model']} -> {summary['output']}",
        f"  settings    {summary['config_summary']}",
        f"  perplexity  {perplexity_line(summary)}",
        f"  size        {size_line(summary)}",
        f"  time        quantization {t['quantize_s']:.1f} s, total {t['total_s']:.1f} s",
    ]
    if summary["export"]:
        lines.append(f"  export      {summary['export']['path']}")
    lines.append(f"  written     {Path(summary['output']) / SUMMARY_FILE}, {Path(summary['output']) / CARD_FILE}")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def _load_section(summary: dict[str, Any], model_class: str) -> list[str]:
    return [
        "## How to load it",
        "",
        "```python",
        "import hf_qlimit  # registers the qlimit quantization method: import it before from_pretrained",
        f"from transformers import AutoTokenizer, {model_class}",
        "",
        f'model = {model_class}.from_pretrained("{summary["output"]}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{summary["output"]}")',
        "```",
        "",
    ]


def _export_section(summary: dict[str, Any]) -> list[str]:
    export = summary["export"]
    if not export:
        return []
    lines = [f"## The {export['format']} export", "", f"`{export['path']}` ({human_bytes(export['bytes'])}).", ""]
    if export["format"] == "gguf":
        lines += ["Run it with llama.cpp:", "", "```bash", f'llama-cli -m {export["path"]} -p "Once upon a time"']
        lines += [f"llama-perplexity -m {export['path']} -f wiki.test.raw", "```", ""]
        if export.get("has_tokenizer") is False:
            lines += ["This file holds no tokenizer metadata: llama.cpp needs it from the source model's GGUF.", ""]
    else:
        lines += ["Plain transformers with the `compressed-tensors` package loads it (no hf_qlimit needed):", ""]
        lines += ["```python", "from transformers import AutoModelForCausalLM", ""]
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{export["path"]}")', "```", ""]
    return lines


def model_card(summary: dict[str, Any], model_class: str) -> str:
    """README.md of the output folder: settings, figures, loading and (for GGUF) running."""
    settings = summary["settings"]
    t, data = summary["timings_s"], summary["data"]
    lines = [
        "---",
        f"base_model: {summary['model']}",
        "library_name: transformers",
        "tags: [hf_qlimit, quantized]",
        "---",
        "",
        f"# {Path(summary['output']).name}",
        "",
        f"`{summary['model']}` quantized with hf_qlimit (`hf-qlimit quantize`).",
        "",
        "## Settings",
        "",
        summary["config_summary"],
        "",
        "Set differently from `QLimitConfig()`'s defaults: "
        + (", ".join(f"`{k}={v!r}`" for k, v in settings.items()) or "nothing")
        + ".",
        "",
        f"Calibration: {data['calib_windows']} windows of {data['seq_len']} tokens from {data['calib']}.",
        "",
        "## Measured",
        "",
        "| | |",
        "|---|---|",
        f"| perplexity | {perplexity_line(summary)} |",
        f"| size | {size_line(summary)} |",
        f"| quantization time | {t['quantize_s']:.1f} s |",
        f"| total time | {t['total_s']:.1f} s |",
        f"| machine | {summary['environment']['device']} ({summary['environment']['processor']}) |",
        "",
    ]
    lines += _load_section(summary, model_class) + _export_section(summary)
    lines += [f"The figures come from `{SUMMARY_FILE}` in this folder, which also holds the full settings.", ""]
    return "\n".join(lines)


def write_model_card(summary: dict[str, Any], model_class: str, out_dir: Path) -> Path:
    path = out_dir / CARD_FILE
    path.write_text(model_card(summary, model_class))
    return path
