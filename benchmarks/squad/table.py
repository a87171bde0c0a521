"""SQuAD v1.1 benchmark: FP / RTN / QDrop x W8A8 / W4A8 / W2A8 on minilm-l6-squad, written into its doc page.

Every setting is one run of `examples/squad/run_qa.py` in a subprocess (same flags as a user would type),
evaluated on the odd articles of the title-sorted SQuAD v1.1 dev set and calibrated on the even ones the
model was fine-tuned on. The table between `<!-- squad-table:start -->` and `<!-- squad-table:end -->`
of docs/results/squad.md (`--marker` names another of its tables) is then rewritten with the machine and the date.

    python -m benchmarks.squad.table            # full table (hours on one CPU core)
    python -m benchmarks.squad.table --quick    # 200 questions, FP + one short QDrop W4A8 run, into a copy of the page
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

from transformers.utils import logging

from benchmarks import common
from benchmarks.common import SHARED, ResultsLog

logger = logging.get_logger("transformers.benchmarks.squad.table")

DOC = common.RESULTS_DOCS / "squad.md"
MARKER = "squad-table"
START, END = common.markers(MARKER)
ALL_SETTINGS = ["fp"] + [f"{m}-w{w}a8" for m in ("rtn", "qdrop") for w in (8, 4, 2)]
_SETTING = re.compile(r"^(rtn|adaround|brecq|qdrop|default)-w(\d)a(\d|none)$")  # default: no --method


def setting_args(setting: str, eval_fp: bool = False) -> list[str]:
    """run_qa.py flags of one setting name: "fp" or "<method>-w<bits>a<bits|none>"."""
    if setting == "fp":
        return ["--no_quantize"]
    match = _SETTING.match(setting)
    if match is None:
        raise ValueError(f"Unknown setting {setting!r}; use 'fp' or e.g. 'qdrop-w4a8'.")
    method, weight_bits, act_bits = match.groups()
    flags = [*common.method_flags(method), "--weight_bits", weight_bits, "--act_bits", act_bits]
    # The FP row comes from its own run; quantized runs skip it unless asked (--quick: one run, two rows).
    return flags if eval_fp else flags + ["--no_eval_fp"]


def run_setting(setting: str, args: argparse.Namespace, extra: list[str], log: ResultsLog) -> dict[str, Any]:
    """results.json of one setting's run (reused with --reuse); exits when the run failed."""
    out_dir = Path(args.output_dir) / (setting + (f"-{args.variant}" if args.variant else ""))
    flags = [
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
        *setting_args(setting, eval_fp=args.quick),
        *extra,
        *shlex.split(args.run_qa_args),
    ]  # quoted values (paths with spaces) stay whole
    if args.max_eval_samples is not None:
        flags += ["--max_eval_samples", str(args.max_eval_samples)]
    results = log.run_example("examples/squad/run_qa.py", flags, out_dir, setting)
    if results is None:  # every row compares with FP: a table with a hole would mislead
        log.check()
    return results


def _machine(environments: list[dict[str, Any] | None]) -> dict[str, str]:
    """Machine, threads and torch of the runs, from their results.json (older results, which recorded no
    versions: this machine)."""
    import torch

    described = {
        (env.get("gpu") or env.get("processor"), str(env.get("torch_threads", "?")), env["versions"]["torch"])
        if env and env.get("versions")
        else (common.cpu_name(), str(torch.get_num_threads()), torch.__version__)
        for env in environments
    }
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
    return common.replace_between_markers(text, marker, common.section(marker, table), where="The page")


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
                "label": {"rtn": "RTN", "qdrop": "QDrop", "brecq": "BRECQ"}.get(method, method)
                + (f" + {variant}" if variant else ""),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SHARED / "models" / "minilm-l6-squad", type=Path)
    parser.add_argument("--data", default=SHARED / "data" / "squad" / "dev-v1.1.json", type=Path)
    parser.add_argument("--output_dir", default=common.OUT / "squad", type=Path)
    where = f"{DOC.relative_to(common.REPO)}; with --quick a copy in output_dir"
    common.add_doc_arguments(parser, None, MARKER, default_text=where)
    parser.add_argument("--settings", nargs="+", default=None, help=f"subset of {ALL_SETTINGS}")
    parser.add_argument("--preset", default="auto", choices=["auto", "fast", "paper"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep settings that already have a results.json")
    parser.add_argument(
        "--variant", default="", help="name of the --run_qa_args below: output folder suffix, row label"
    )
    parser.add_argument("--run_qa_args", default="", help="more run_qa.py flags, e.g. '--transforms hadamard_inputs'")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 200 questions, one short QDrop W4A8 run that also evaluates FP",
    )
    args = parser.parse_args(argv)
    args.extra = []
    if args.quick:
        args.max_eval_samples = args.max_eval_samples or 200
        # One run gives both rows: FP evaluation is kept on, reconstruction is cut short.
        args.settings = args.settings or ["qdrop-w4a8"]
        args.extra = ["--num_samples", "32", "--iters", "20", "--batch_size", "8"]
        args.output_dir = args.output_dir.with_name(args.output_dir.name + "_quick")
    args.settings = args.settings or ALL_SETTINGS
    args.doc = args.doc or (args.output_dir / "README.quick.md" if args.quick else DOC)
    return args


def measured_days(environments: list[dict[str, Any] | None]) -> str:
    """The day the runs started, or '<first> to <last>' (today for runs that recorded none)."""
    return common.day_span(env["date"] for env in environments if env and env.get("date"))


def header(args: argparse.Namespace, environments: list[dict[str, Any] | None]) -> dict[str, str]:
    """What the table's first line says: date, machine, data, preset and the model's reference scores."""
    reference = ""
    ref_file = Path(args.model) / "reference.json"
    if ref_file.exists():
        ref = json.loads(ref_file.read_text())["eval_metric_fp16_weights_fp32_compute"]
        reference = f"Reference FP (`reference.json`): EM {ref['exact_match']:.2f}, F1 {ref['f1']:.2f}."
    n_questions = f"first {args.max_eval_samples} questions" if args.max_eval_samples else "all 4,905 questions"
    return {
        "date": measured_days(environments),
        **_machine(environments),
        "preset": args.preset + (" (--quick: 32 samples, 20 iters)" if args.quick else ""),
        "data": f"SQuAD v1.1 dev, odd title-sorted articles ({n_questions}), max_seq_length 256, doc_stride 64",
        "reference": reference,
    }


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    logging.enable_default_handler()
    logger.setLevel(logging.INFO)
    log = ResultsLog("squad.table", args.reuse, env=common.offline_env(args.threads))
    rows: list[dict[str, Any]] = []
    environments = []
    for setting in args.settings:
        results = run_setting(setting, args, args.extra, log)
        rows += rows_from(results, args.variant)
        environments.append(results.get("environment"))
    rows.sort(key=_row_order)
    table = format_table(rows, header(args, environments))
    doc = common.doc_target(args)
    if doc is not None and not doc.exists():  # --quick: a copy of the page, so that the real one keeps its table
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(DOC.read_text())
    common.publish(table, args.marker, doc, "squad.table")
    return table


if __name__ == "__main__":
    main()
