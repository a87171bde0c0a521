"""The deployment benchmark's table, without running anything: one table per model with its target verdicts, the
MiniLM export check and the machine (`benchmarks.deploy.packed` measures the rows)."""

from __future__ import annotations

import os
from typing import Any

REFERENCE = "W4 cached fp32 (old default)"  # exact fake quantization: what the W4 rows are compared with


def _targets(name: str, rows: dict[str, Any]) -> list[str]:
    fp, w4 = rows["FP32"], rows["W4 packed (hf_qlimit default)"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = []
    if name == "smollm2":
        mem = w4["mb_after_generate"] / fp["mb_after_generate"]
        rss = w4["rss_mb"] / fp["rss_mb"]
        above = [r["rss_mb"] - r["rss_imports_mb"] for r in (w4, fp)]
        speed, cpu = w4["tok_s_1t"] / fp["tok_s_1t"], w4["tok_s_cpu_1t"] / fp["tok_s_cpu_1t"]
        ct = rows["W4 compressed-tensors, no hf_qlimit"]
        lines += [
            f"parameters + buffers after generate {mem:.2f}x FP32 (target <= 0.25): {verdict(mem <= 0.25)}",
            f"process RSS {rss:.2f}x FP32 (target <= 0.5): {verdict(rss <= 0.5)}; RSS above the imports "
            f"{above[0]:.0f} MB against {above[1]:.0f} MB ({above[0] / above[1]:.2f}x)",
            f"decode {speed:.2f}x FP32 at 1 thread by the wall clock, {cpu:.2f}x by CPU time (target >= 1.0): "
            f"{verdict(speed >= 1.0)} / {verdict(cpu >= 1.0)}",
            f"compressed-tensors logits within {ct['logits_rel_diff']:.1e} relative of hf_qlimit's "
            f"(target 1e-3): {verdict(ct['logits_rel_diff'] <= 1e-3)}",
        ]
        if "ppl" in ct:
            same = f"{ct['ppl']:.2f}" == f"{rows[REFERENCE]['ppl']:.2f}"
            lines.append(
                f"compressed-tensors perplexity {ct['ppl']:.2f} vs {rows[REFERENCE]['ppl']:.2f} "
                f"(same to 2 decimals): {verdict(same)}"
            )
    else:
        speed, cpu = w4["tok_s_1t"] / fp["tok_s_1t"], w4["tok_s_cpu_1t"] / fp["tok_s_cpu_1t"]
        lines.append(
            f"decode {speed:.2f}x FP32 at 1 thread by the wall clock, {cpu:.2f}x by CPU time (target >= 2.0): "
            f"{verdict(speed >= 2.0)} / {verdict(cpu >= 2.0)}"
        )
    return lines


def _row_cells(label: str, r: dict[str, Any], threads: list[int], ppl: bool) -> list[str]:
    cells = [
        label,
        f"{r['load_s']:.1f}",
        f"{r['mb_after_load']:.0f}",
        f"{r['mb_after_generate']:.0f}",
        f"{r['rss_mb']:.0f} ({r['rss_imports_mb']:.0f})",
        f"{r['peak_rss_mb']:.0f}",
    ]
    cells += [f"{r[f'tok_s_{t}t']:.1f}" for t in threads]
    cells.append(f"{r['tok_s_cpu_1t']:.1f}" if "tok_s_cpu_1t" in r else "–")
    ref = r["logits_ref"]
    cached = " cached" if ref == REFERENCE else ""
    cells.append("–" if ref == label else f"{r['logits_rel_diff']:.1e} ({ref.split(' ')[0]}{cached})")
    return cells + ([f"{r['ppl']:.2f}"] if ppl else [])


def _model_table(name: str, res: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """One model's title, rows, load, targets and date."""
    rows, threads = res["rows"], res.get("threads") or results["threads"]  # each model: the threads it ran
    title = "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)" if name == "smollm2" else f"random {name}-shaped OPT"
    head = ["variant", "load s", "MB after load", "MB after generate", "RSS MB (imports)", "peak RSS MB"]
    head += [f"tok/s {t}T" for t in threads] + ["tok/CPU-s 1T", "logits rel. diff (vs)"]
    head += ["ppl"] if res["ppl_windows"] else []
    parts = [
        f"**{title}**, W4 g64 weight-only RTN (embeddings and head 8-bit g64).\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    parts += [
        "| " + " | ".join(_row_cells(label, r, threads, bool(res["ppl_windows"]))) + " |" for label, r in rows.items()
    ]
    loads = [x for r in rows.values() for x in r["load_avg"]]
    parts.append(
        f"\nLoad average (1 min) during these runs: {min(loads):.2f} to {max(loads):.2f} on "
        f"{os.cpu_count()} CPUs. Targets: " + "; ".join(_targets(name, rows)) + ".\n"
    )
    reps = f", best of {res['reps']} repetitions" if res.get("reps") else ""
    parts.append(
        f"Measured {res.get('date') or results['date']} at hf_qlimit commit "
        f"{res.get('commit') or results['commit']}{reps}.\n"
    )
    if res["ppl_windows"]:
        parts.append(
            f"Perplexity: WikiText-2 test (tokenized v1 release), first {res['ppl_windows']} windows of 512.\n"
        )
    return parts


def table(results: dict[str, Any]) -> str:
    """The section's body: a table per model with its targets, the MiniLM export check, the machine."""
    parts = [line for name, res in results["models"].items() for line in _model_table(name, res, results)]
    if "minilm" in results:
        m = results["minilm"]
        ok = "met" if m["rel_diff"] <= 1e-3 else "NOT met"
        parts.append(
            f"all-MiniLM-L6-v2 W4 g64: the compressed-tensors export, loaded without hf_qlimit, gives the "
            f"last hidden state within {m['rel_diff']:.1e} relative of hf_qlimit's on {m['sentences']} "
            f"sentences (target 1e-3: {ok}).\n"
        )
    parts.append(
        f"Machine: {results['machine']}. "
        "RSS (imports): the process RSS after the 64-token generate, and in parentheses after the imports "
        "alone (torch, transformers with its modeling code, and hf_qlimit in its rows). Generated by "
        "`python -m benchmarks.deploy.packed`."
    )
    return "\n".join(parts)
