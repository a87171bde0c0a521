"""The offload benchmark's report, without running anything: byte and time formats, the RSS verdict, the
comparison of two quantized checkpoints, and the table (`benchmarks.deploy.offload` measures)."""

from __future__ import annotations

import math
from typing import Any

GB, MIB = 10**9, 2**20
LABELS = {"opt-1.3b": "OPT-1.3b-shaped", "opt-125m": "OPT-125m-shaped", "opt-tiny": "tiny OPT"}
LOAD_LABELS = {"disk": "disk offload", "memory": "in memory", "cpu": 'device_map="cpu"', "auto": 'device_map="auto"'}
METHOD_LABELS = {"rtn": "round-to-nearest", "adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "QDrop"}


def format_bytes(n: float | None) -> str:
    """Decimal units, as the 1.5 GB limit is stated: '1.23 GB', '812 MB', '4.1 kB'; None is '–'."""
    if n is None:
        return "–"
    for unit, size in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            value = n / size
            digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0  # three significant figures
            return f"{value:.{digits}f} {unit}"
    return f"{n:.0f} B"


def rss_verdict(peak_bytes: int | None, limit_bytes: int) -> str:
    """'PASS' when the peak is within the limit, 'FAIL' above it, 'FAIL (no measurement)' without one."""
    if peak_bytes is None:
        return "FAIL (no measurement)"
    return "PASS" if peak_bytes <= limit_bytes else "FAIL"


def compare_state_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Tensor by tensor with `torch.equal`: 'equal', else the names that differ and the largest |a - b|.

    A name missing on one side, or a shape or dtype mismatch, counts as a difference of infinity.
    """
    import torch

    differing: dict[str, float] = {}
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            differing[name] = math.inf
        elif not torch.equal(x, y):
            differing[name] = (x.double() - y.double()).abs().max().item()  # packed int codes too: in float64
    return {
        "equal": not differing,
        "tensors": len(set(a) | set(b)),
        "differing": sorted(differing),
        "max_abs_diff": max(differing.values(), default=0.0),
        "only_in_first": sorted(set(a) - set(b)),
        "only_in_second": sorted(set(b) - set(a)),
    }


def comparison_text(cmp: dict[str, Any] | None, label: str) -> str:
    if cmp is None:
        return f"Bit-identity, {label}, in memory against disk offload: not measured (a run failed)."
    if cmp["equal"]:
        return (
            f"Bit-identity, {label}, in memory against disk offload: **equal** (all {cmp['tensors']} saved "
            "tensors, `torch.equal`)."
        )
    names = ", ".join(f"`{n}`" for n in cmp["differing"][:5]) + (", …" if len(cmp["differing"]) > 5 else "")
    return (
        f"Bit-identity, {label}, in memory against disk offload: **differ** in {len(cmp['differing'])} of "
        f"{cmp['tensors']} saved tensors, max abs difference {cmp['max_abs_diff']:.3g} ({names})."
    )


def format_seconds(x: float) -> str:
    """'812 s', '3.2 s': tenths only where they matter."""
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _row(run: str, result: dict[str, Any] | None, limit_bytes: int) -> str:
    if not result or "error" in result:
        return f"| {run} | failed | – | – | – | – | – | – | – |"
    blocks = [b["seconds"] for b in result["block_errors"] if b.get("seconds") is not None]
    per_block = f"{format_seconds(sum(blocks) / len(blocks))} / {format_seconds(max(blocks))}" if blocks else "–"
    rss = f"{format_bytes(result['peak_rss_bytes'])}"
    if run == "large":  # the limit is the large run's target; the others are there for comparison
        peak = result["peak_rss_bytes"]
        if peak is not None and format_bytes(peak) == format_bytes(limit_bytes):  # too close to call at 3 digits
            rss = f"{peak / GB:.4f} GB"
        rss += f" ({rss_verdict(peak, limit_bytes)}, limit {format_bytes(limit_bytes)})"
    mse = result["block_errors"]
    errors = (
        f"{sum(b['rtn_mse'] for b in mse) / len(mse):.3g} → {sum(b['mse'] for b in mse) / len(mse):.3g}" if mse else "–"
    )
    return (
        f"| {LABELS.get(result['model'], result['model'])}, {LOAD_LABELS.get(result['load'], result['load'])} | "
        f"{format_bytes(result['model_bytes'])} | {rss} | {format_seconds(result['seconds']['load'])} | "
        f"{format_seconds(result['seconds']['quantize'])} | {per_block} | {errors} | "
        f"{format_bytes(result.get('work_dir_bytes'))} | {format_bytes(result['saved_bytes'])} |"
    )


def render_table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The doc section's body: the settings, one row per run, the bit-identity line, machine/date/command."""
    limit = meta["rss_limit_bytes"]
    lines = [
        (
            f"Random-weight models (fp32, seeded), W4A8 {METHOD_LABELS[meta.get('method', 'qdrop')]}, "
            f"{meta['num_samples']} random-token samples of {meta['seq_len']} tokens, batch {meta['batch_size']}"
            + (f", {meta['iters']} iterations per block" if meta.get("method", "qdrop") != "rtn" else "")
            + "; activation "
            f"cache budget {format_bytes(meta['cache_budget_bytes'])} for the large run, "
            f"{format_bytes(meta['compare_cache_budget_bytes'])} for the offloaded comparison run (none in memory). "
            "Peak RSS is `ru_maxrss` of the run's own process (load, quantize, save); block MSE is the mean output "
            "error of the blocks, round-to-nearest → the method; work_dir is what the run left there (spilled caches, "
            "resume state)."
        ),
        "",
        "| model, weights | fp32 size | peak RSS | load | quantize | per block (mean / max) | block MSE | work_dir "
        "| saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in ("large", "compare-memory", "compare-disk"):
        if run in results["runs"]:
            lines.append(_row(run, results["runs"][run], limit))
    if "comparison" in results:
        lines += ["", comparison_text(results["comparison"], LABELS.get(meta["compare_model"], meta["compare_model"]))]
    lines += ["", f"Measured {meta['date']} on {meta['machine']}. Generated by `{meta['command']}`."]
    return "\n".join(lines)
