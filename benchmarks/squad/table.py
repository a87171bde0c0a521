#!/usr/bin/env python
"""SQuAD v1.1 benchmark: FP / RTN / QDrop x W8A8 / W4A8 / W2A8 on minilm-l6-squad, written into the README.

Every setting is one run of `examples/squad/run_qa.py` in a subprocess (same flags as a user would type),
evaluated on the odd articles of the title-sorted SQuAD v1.1 dev set and calibrated on the even ones the
model was fine-tuned on. The table between `<!-- squad-table:start -->` and `<!-- squad-table:end -->`
in examples/squad/README.md is then rewritten with the machine and the date.

    python benchmarks/squad_table.py            # full table (hours on one CPU core)
    python benchmarks/squad_table.py --quick    # 200 questions, FP + one short QDrop W4A8 run, README copy
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this script
import _common

logger = logging.get_logger("transformers.benchmarks.squad_table")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RUN_QA = REPO / "examples" / "squad" / "run_qa.py"
README = REPO / "examples" / "squad" / "README.md"
MARKER = "squad-table"
START, END = _common.markers(MARKER)
ALL_SETTINGS = ["fp"] + [f"{m}-w{w}a8" for m in ("rtn", "qdrop") for w in (8, 4, 2)]
_SETTING = re.compile(r"^(rtn|adaround|brecq|qdrop)-w(\d)a(\d|none)$")


def setting_args(setting: str, eval_fp: bool = False) -> list[str]:
    """run_qa.py flags of one setting name: "fp" or "<method>-w<bits>a<bits|none>"."""
    if setting == "fp":
        return ["--no_quantize"]
    match = _SETTING.match(setting)
    if match is None:
        raise ValueError(f"Unknown setting {setting!r}; use 'fp' or e.g. 'qdrop-w4a8'.")
    method, weight_bits, act_bits = match.groups()
    flags = ["--method", method, "--weight_bits", weight_bits, "--act_bits", act_bits, *_common.drop_flags(method)]
    # The FP row comes from its own run; quantized runs skip it unless asked (--quick: one run, two rows).
    return flags if eval_fp else flags + ["--no_eval_fp"]


def run_setting(setting: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    out_dir = Path(args.output_dir) / (setting + (f"-{args.variant}" if args.variant else ""))
    if args.reuse and (out_dir / "results.json").is_file():
        return json.loads((out_dir / "results.json").read_text())
    cmd = [
        sys.executable,
        str(RUN_QA),
        "--model_name_or_path",
        str(args.model),
        "--validation_file",
        str(args.data),
        "--article_parity",
        "odd",  # calibration then comes from the even (training) articles
        "--max_seq_length",
        "256",
        "--doc_stride",
        "64",  # the recipe of reference.json
        "--per_device_eval_batch_size",
        "32",
        "--preset",
        args.preset,
        "--output_dir",
        str(out_dir),
        *setting_args(setting, eval_fp=args.quick),
        *extra,
        *shlex.split(args.run_qa_args),  # quoted values (paths with spaces) stay whole
    ]
    if args.max_eval_samples is not None:
        cmd += ["--max_eval_samples", str(args.max_eval_samples)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    logger.info(f"{setting}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    results = json.loads((out_dir / "results.json").read_text())
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return results


def _machine(environments: list[dict[str, Any] | None]) -> dict[str, str]:
    """Machine, threads and torch of the runs, from their results.json (older results: this machine)."""
    import torch

    described = {
        (env.get("gpu") or env.get("processor"), str(env.get("torch_threads", "?")), env["versions"]["torch"])
        if env else (_common.cpu_name(), str(torch.get_num_threads()), torch.__version__)
        for env in environments
    }  # fmt: skip
    return {key: ", ".join(sorted({d[i] for d in described})) for i, key in enumerate(("machine", "threads", "torch"))}


def format_table(rows: list[dict[str, Any]], header: dict[str, str]) -> str:
    """Markdown table; `rows` hold label, bits, em, f1 and quantize_seconds (None for FP)."""
    fp = next((r for r in rows if r["bits"] == "FP32"), None)
    lines = [
        (
            f"Measured {header['date']} on {header['machine']} ({header['threads']} torch thread(s), torch "
            f"{header['torch']}); {header['data']}; preset `{header['preset']}`."
        ),
        "",
        "| Method | W/A bits | EM | F1 | ΔF1 vs FP | Quantize time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if fp is None or r is fp else f"{r['f1'] - fp['f1']:+.2f}"
        q_time = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds'] / 60:.1f} min"
        lines.append(f"| {r['label']} | {r['bits']} | {r['em']:.2f} | {r['f1']:.2f} | {delta} | {q_time} |")
    if header.get("reference"):
        lines += ["", header["reference"]]
    return "\n".join(lines)


def replace_table(text: str, table: str, marker: str = MARKER) -> str:
    """Replaces what lies between the two markers (kept) by `table`."""
    return _common.replace_between_markers(text, marker, _common.section(marker, table), where="The README")


def rows_from(results: dict[str, Any], variant: str = "") -> list[dict[str, Any]]:
    rows = []
    stages = results["results"]
    if "fp" in stages:
        rows.append(
            {
                "label": "FP",
                "bits": "FP32",
                "em": stages["fp"]["exact_match"],
                "f1": stages["fp"]["f1"],
                "quantize_seconds": None,
            }
        )
    if "quantized" in stages:
        method, bits = results["quantization"]["label"].split()
        # Report the model reloaded from disk when there is one: that is what a user gets.
        scores = stages.get("reloaded", stages["quantized"])
        rows.append(
            {
                "label": {"rtn": "RTN", "qdrop": "QDrop"}.get(method, method) + (f" + {variant}" if variant else ""),
                "bits": bits[1:].replace("A", "/"),
                "em": scores["exact_match"],
                "f1": scores["f1"],
                "quantize_seconds": results["quantization"]["quantize_seconds"],
            }
        )
    return rows


def _row_order(row: dict[str, Any]) -> tuple[int, int, int]:
    # FP first, then RTN before the other methods, each from 8 down to 2 weight bits.
    if row["bits"] == "FP32":
        return (0, 0, 0)
    return (1, int(row["label"] != "RTN"), -int(row["bits"].split("/")[0]))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SHARED / "models" / "minilm-l6-squad", type=Path)
    parser.add_argument("--data", default=SHARED / "data" / "squad" / "dev-v1.1.json", type=Path)
    parser.add_argument("--output_dir", default=REPO / "benchmarks" / "out" / "squad", type=Path)
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="README to rewrite (default: examples/squad/README.md; with --quick a copy in output_dir)",
    )
    parser.add_argument("--settings", nargs="+", default=None, help=f"subset of {ALL_SETTINGS}")
    parser.add_argument("--preset", default="auto", choices=["auto", "fast", "paper"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep settings that already have a results.json")
    parser.add_argument("--variant", default="", help="name of the --run_qa_args below: output folder suffix, row label")
    parser.add_argument("--run_qa_args", default="", help="more run_qa.py flags, e.g. '--transforms hadamard_inputs'")
    parser.add_argument("--marker", default=MARKER, help="README section to rewrite (another one keeps the main table)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 200 questions, one short QDrop W4A8 run that also evaluates FP",
    )
    args = parser.parse_args(argv)
    logging.enable_default_handler()
    logger.setLevel(logging.INFO)

    extra: list[str] = []
    settings = args.settings or ALL_SETTINGS
    if args.quick:
        args.max_eval_samples = args.max_eval_samples or 200
        # One run gives both rows: FP evaluation is kept on, reconstruction is cut short.
        settings = args.settings or ["qdrop-w4a8"]
        extra = ["--num_samples", "32", "--iters", "20", "--batch_size", "8"]
        args.output_dir = args.output_dir.with_name(args.output_dir.name + "_quick")
    readme = args.readme or (args.output_dir / "README.quick.md" if args.quick else README)

    rows: list[dict[str, Any]] = []
    environments = []
    for setting in settings:
        results = run_setting(setting, args, extra)
        rows += rows_from(results, args.variant)
        environments.append(results.get("environment"))
    rows.sort(key=_row_order)

    reference = ""
    ref_file = Path(args.model) / "reference.json"
    if ref_file.exists():
        ref = json.loads(ref_file.read_text())["eval_metric_fp16_weights_fp32_compute"]
        reference = f"Reference FP (`reference.json`): EM {ref['exact_match']:.2f}, F1 {ref['f1']:.2f}."
    n_questions = f"first {args.max_eval_samples} questions" if args.max_eval_samples else "all 4,905 questions"
    header = {
        "date": datetime.date.today().isoformat(),
        **_machine(environments),
        "preset": args.preset + (" (--quick: 32 samples, 20 iters)" if args.quick else ""),
        "data": f"SQuAD v1.1 dev, odd title-sorted articles ({n_questions}), max_seq_length 256, doc_stride 64",
        "reference": reference,
    }
    table = format_table(rows, header)
    if not readme.exists():
        readme.parent.mkdir(parents=True, exist_ok=True)
        readme.write_text(README.read_text())
    readme.write_text(replace_table(readme.read_text(), table, args.marker))
    logger.info(f"Table written to {readme}:\n{table}")
    return table


if __name__ == "__main__":
    main()
