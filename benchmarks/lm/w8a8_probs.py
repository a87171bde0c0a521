"""SmolLM2 W8A8: which grid of the attention probabilities keeps 8-bit activations near-lossless. Each setting runs
examples/language-modeling/run_ppl.py (FP and quantized perplexity on the same windows) in its own process; the
table goes between `<!-- w8a8-probs:start -->` and `<!-- w8a8-probs:end -->` of docs/results/language-modeling.md.

    python -m benchmarks.lm.w8a8_probs                                  # every setting
    python -m benchmarks.lm.w8a8_probs --settings rtn-unit rtn-log2     # some (run two such jobs side by side)
    python -m benchmarks.lm.w8a8_probs --reuse only                     # the table of what was measured
    python -m benchmarks.lm.w8a8_probs --reuse only --settings rtn-default auto-default --marker w8a8-defaults

Every setting names its probability options on the command line, so that its row reproduces whatever the
defaults become; the table says which row the defaults give.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ResultsLog
from benchmarks.lm.table import DOC

MARKER = "w8a8-probs"
SCRIPT = "examples/language-modeling/run_ppl.py"
MODEL = Path("/tmp/bl/smollm2")  # `python -m hf_qlimit.cli.gguf_to_hf --output_dir /tmp/bl/smollm2`
BASE = ["--seq_len", "512", "--weight_bits", "8", "--act_bits", "8", "--num_calib_samples", "32"]


def flags(attention: bool, grid: str = "uniform", dynamic: bool = False, first: bool = False, transform: str = "none"):
    """Every activation option of a row spelled out, so that the row stays what it was whatever the defaults."""
    out = ["--quantize_attention", str(attention).lower(), "--act_dynamic", str(dynamic).lower()]
    out += ["--prob_grid", grid, "--transforms", transform] + (["--act_fp_first_token"] if first else [])
    return out


DYNAMIC = "Linear inputs per token at run time (`act_dynamic`)"
# name -> (label, method, options)
SETTINGS: dict[str, tuple[str, str, list[str]]] = {
    "rtn-default": ("**the defaults** (no option)", "rtn", []),
    "auto-default": ("**the defaults** (no option)", "auto", []),
    "rtn-uniform": ("uniform probabilities, range searched (the default before issue 32)", "rtn", flags(True)),
    "rtn-unit": ("unit probabilities, fixed [0, 1]", "rtn", flags(True, "unit")),
    "rtn-log2": ("log2 probabilities", "rtn", flags(True, "log2")),
    "rtn-noattn": ("attention matmuls FP (Linear inputs only)", "rtn", flags(False)),
    "rtn-uniform-first": (
        "uniform probabilities, first token FP (`act_fp_first_token`)",
        "rtn",
        flags(True, first=True),
    ),
    "rtn-noattn-first": ("attention matmuls FP, first token FP", "rtn", flags(False, first=True)),
    "rtn-uniform-dynamic": (f"uniform probabilities, {DYNAMIC}", "rtn", flags(True, dynamic=True)),
    "rtn-dynamic-first": (
        f"uniform probabilities, {DYNAMIC}, first token FP",
        "rtn",
        flags(True, dynamic=True, first=True),
    ),
    "rtn-dynamic-noattn": (f"attention matmuls FP, {DYNAMIC}", "rtn", flags(False, dynamic=True)),
    "rtn-dynamic-log2": (f"log2 probabilities, {DYNAMIC}", "rtn", flags(True, "log2", dynamic=True)),
    "rtn-dynamic-unit": (f"unit probabilities, {DYNAMIC}", "rtn", flags(True, "unit", dynamic=True)),
    "rtn-dynamic-noattn-hdown": (
        f"attention matmuls FP, {DYNAMIC}, FFN down input rotated (`hadamard_down`)",
        "rtn",
        flags(False, dynamic=True, transform="hadamard_down"),
    ),
    "rtn-dynamic-unit-hdown": (
        f"unit probabilities, {DYNAMIC}, FFN down input rotated",
        "rtn",
        flags(True, "unit", dynamic=True, transform="hadamard_down"),
    ),
    "rtn-dynamic-unit-hinputs": (
        f"unit probabilities, {DYNAMIC}, every Linear input rotated (`hadamard_inputs`)",
        "rtn",
        flags(True, "unit", dynamic=True, transform="hadamard_inputs"),
    ),
    "auto-uniform": ("uniform probabilities, range searched (the default before issue 32)", "auto", flags(True)),
    "auto-noattn": ("attention matmuls FP (Linear inputs only)", "auto", flags(False)),
}


def arguments(name: str, model: Path, windows: int) -> list[str]:
    """run_ppl.py's arguments of setting `name` (without --output_dir)."""
    _, method, options = SETTINGS[name]
    data = common.SHARED / "data" / "wikitext-2"
    return [
        "--model_name_or_path",
        str(model),
        "--eval_file",
        str(data / "test.txt"),
        "--calib_file",
        str(data / "valid.txt"),
        *BASE,
        "--method",
        method,
        "--max_eval_windows",
        str(windows),
        *options,
    ]


def render(runs: dict[str, dict[str, Any]], windows: int, names: list[str]) -> str:
    lines = [
        "| method | activations | FP ppl | W8A8 ppl | × FP | quantize (min) | load at start | commit |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        label, method, _ = SETTINGS[name]
        r = runs.get(name)
        if not r:
            lines.append(f"| {method} | {label} | – | – | – | – | – | – |")
            continue
        fp, q = r["fp"]["ppl"], r["quantized"]["ppl"]
        load = r.get("load_average_at_start")
        minutes = r["timings_s"]["quantize_s"] / 60
        method_shown = "auto (fast-lm: QDrop, 50 iterations)" if method == "auto" else method
        lines.append(
            f"| {method_shown} | {label} | {fp:.2f} | {q:.2f} | {q / fp:.3f} | {minutes:.1f} | "
            f"{'–' if load is None else format(load, '.2f')} | {r.get('commit', 'not recorded')} |"
        )
    done = [runs[n] for n in names if runs.get(n)]
    days, threads = common.measured(done)
    base = " ".join(BASE)
    options = "; ".join(f"{name}: `{' '.join(SETTINGS[name][2]) or '(none)'}`" for name in names)
    lines += [
        "",
        f"SmolLM2-135M-Instruct (FP weights from the Q4_1 GGUF), WikiText-2 test perplexity over the first {windows} "
        f"windows of 512 tokens, 32 calibration windows from the validation text, 8-bit weights per channel, "
        f"embeddings and head at 8 bits. Each row: `python {SCRIPT} --model_name_or_path {MODEL} --eval_file "
        f"../shared/data/wikitext-2/test.txt --calib_file ../shared/data/wikitext-2/valid.txt {base} --method M "
        f"--max_eval_windows {windows} --output_dir DIR` plus the row's options "
        f"({options}). "
        f"Measured on {common.machine(threads=threads)}, {days}; load average (`/proc/loadavg`, 1 min) when the "
        "run started and the commit it ran on in the last columns (`+local changes`: uncommitted edits). "
        f"Generated by `{common.command('benchmarks.lm.w8a8_probs')}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out_dir", type=Path, default=common.OUT / "w8a8_probs")
    parser.add_argument(
        "--reuse", nargs="?", const="yes", default=None, choices=["yes", "only"], help="Keep runs with results."
    )
    common.add_doc_arguments(parser, DOC, MARKER)
    args = parser.parse_args(argv)
    reuse = {"yes": True, "only": "only"}.get(args.reuse, False)
    log = ResultsLog("lm.w8a8_probs", reuse=reuse, env=common.offline_env(threads=1))
    runs = {}
    for name in SETTINGS:
        wanted = name in args.settings
        run_log = log if wanted else ResultsLog("lm.w8a8_probs", reuse="only")
        fresh = wanted and not (reuse and (args.out_dir / name / "results.json").is_file())
        commit = common.commit() if fresh else None  # the code a fresh run starts on (results.json has none)
        record = run_log.run_example(SCRIPT, arguments(name, args.model, args.windows), args.out_dir / name, name)
        if fresh and record:
            record = common.add_commit(args.out_dir / name / "results.json", commit)
        runs[name] = record or {}
        if wanted and record:
            log.log(f"{name}: {record['quantized']['ppl']:.2f} (FP {record['fp']['ppl']:.2f})")
    table = render(runs, args.windows, args.settings)
    common.publish(table, args.marker, common.doc_target(args), "lm.w8a8_probs")
    log.check()


if __name__ == "__main__":
    main()
