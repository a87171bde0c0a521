#!/usr/bin/env python
"""GLUE results table of examples/glue/README.md: runs examples/glue/run_glue.py on the reference models.

For sst2, mrpc and stsb (models from ../shared/models/minilm-l6-<task>, data from ../shared/data/glue), each
method (RTN, QDrop) and each setting (W8A8, W4A8, W2A8), runs the script in its own process, collects the
`results.json` files and rewrites the table between `<!-- glue-table:start -->` and `<!-- glue-table:end -->`
in examples/glue/README.md, with the machine and the date.

    python benchmarks/glue_table.py                 # everything: hours on a laptop CPU
    python benchmarks/glue_table.py --reuse         # only the runs without a results.json yet
    python benchmarks/glue_table.py --quick         # one tiny run (sst2, RTN W8A8, 64 dev sentences), printed only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this script
import _common

REPO = Path(__file__).resolve().parents[1]
RUN_GLUE = REPO / "examples" / "glue" / "run_glue.py"
README = REPO / "examples" / "glue" / "README.md"
MARKER = "glue-table"
START, END = _common.markers(MARKER)

MODELS = {"sst2": "minilm-l6-sst2", "mrpc": "minilm-l6-mrpc", "stsb": "minilm-l6-stsb"}
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B"}
# "Default": no --method, so whatever QLimitConfig's defaults resolve to (`_common.method_flags`).
METHODS = {"RTN": "rtn", "AdaRound": "adaround", "BRECQ": "brecq", "QDrop": "qdrop", "Default": "default"}
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W2A8": (2, 8), "W4A4": (4, 4)}
DEFAULT_METHODS, DEFAULT_SETTINGS = ["RTN", "QDrop"], ["W8A8", "W4A8", "W2A8"]
METRIC_NAMES = {
    "accuracy": "acc",
    "f1": "F1",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
    "matthews_correlation": "MCC",
}
# A smoke test of the whole chain, not a measurement: a few sentences, one setting.
QUICK = {
    "tasks": ["sst2"],
    "methods": ["RTN"],
    "settings": ["W8A8"],
    "extra": ["--max_eval_samples", "64", "--num_samples", "16"],
}

Key = tuple[str, str, str]  # (task, method, setting)


def run_one(task: str, method: str, setting: str, shared: Path, out_dir: Path, extra: list[str], reuse: bool):
    """results.json of one run (reused when asked and present), or None when the run failed."""
    weight_bits, act_bits = SETTINGS[setting]
    out = out_dir / task / f"{METHODS[method]}-{setting.lower()}"
    if reuse and (out / "results.json").is_file():
        return _common.read_results(out / "results.json")
    if reuse == "only":  # table from what was measured: a missing run is a blank cell, not a new run
        return {}
    cmd = [
        sys.executable,
        str(RUN_GLUE),
        "--model_name_or_path",
        str(shared / "models" / MODELS[task]),
        "--task_name",
        task,
        "--data_dir",
        str(shared / "data" / "glue"),
        "--output_dir",
        str(out),
        *_common.method_flags(METHODS[method]),
        "--weight_bits",
        str(weight_bits),
        "--act_bits",
        str(act_bits),
        "--per_device_eval_batch_size",
        "64",
        *extra,
    ]
    print(f"[glue_table] {task} {method} {setting}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, check=False).returncode != 0:  # one failed run should not cost the others
        print(f"[glue_table] FAILED: {task} {method} {setting}", file=sys.stderr)
        return None
    return _common.read_results(out / "results.json")


def _gpu(result: dict[str, Any]) -> str | None:
    """The GPU a run quantized on, or None for a CPU run (results without `environment` predate GPU runs)."""
    return (result.get("environment") or {}).get("gpu")


def _seconds(result: dict[str, Any]) -> str:
    """Quantization wall time; † marks a GPU run, whose time is not comparable with the CPU ones."""
    return f"{result['timings_s']['quantize_s']:.0f} s" + (" †" if _gpu(result) else "")


def _cell(metrics: dict[str, dict[str, float]]) -> str:
    """Every metric of every split, in percent: '78.4/85.4'."""
    return "/".join(f"{100 * v:.1f}" for split in metrics.values() for v in split.values())


def _metric_label(metrics: dict[str, dict[str, float]]) -> str:
    names = [METRIC_NAMES.get(name, name) for split in metrics.values() for name in split]
    return "/".join(names)


def build_tables(
    results: dict[Key, dict[str, Any] | None], tasks: list[str], methods: list[str], settings: list[str]
) -> str:
    """Markdown: a metric table (FP and each method x setting) and a table of quantization times."""
    columns = [(m, s) for m in methods for s in settings]
    tasks = [t for t in tasks if any(results.get((t, m, s)) for m, s in columns)]  # nothing measured: no row
    head = "| " + " | ".join(f"{m} {s}" for m, s in columns) + " |"
    rule = "|---|---|" + "---:|" * len(columns)
    metric_rows, time_rows = [], []
    for task in tasks:
        runs = [results.get((task, m, s)) for m, s in columns]
        done = [r for r in runs if r]
        fp = _cell(done[0]["fp"]) if done else "–"
        label = _metric_label(done[0]["fp"]) if done else ""
        cells = [_cell(r["quantized"]) if r else ("–" if r == {} else "failed") for r in runs]
        metric_rows.append(f"| {TASK_NAMES.get(task, task)} ({label}) | {fp} | " + " | ".join(cells) + " |")
        times = [_seconds(r) if r else "–" for r in runs]
        time_rows.append(f"| {TASK_NAMES.get(task, task)} | " + " | ".join(times) + " |")
    return "\n".join(
        [
            "| Task (metric) | FP " + head,
            rule,
            *metric_rows,
            "",
            "Quantization time:",
            "",
            "| Task " + head,
            "|---|" + "---:|" * len(columns),
            *time_rows,
        ]
    )


def build_method_tables(
    results: dict[Key, dict[str, Any] | None], tasks: list[str], methods: list[str], settings: list[str]
) -> str:
    """Markdown, one row per task and method with a column per setting: readable with many methods.

    Each cell is "metric (quantization seconds)"; tasks without any measured run are left out.
    """
    lines = [
        "| Task (metric) | FP | Method | " + " | ".join(settings) + " |",
        "|---|---:|---|" + "---:|" * len(settings),
    ]
    for task in tasks:
        done = [r for (t, _, _), r in results.items() if t == task and r]
        if not done:
            continue
        title = f"{TASK_NAMES.get(task, task)} ({_metric_label(done[0]['fp'])})"
        for method in methods:
            cells = []
            for setting in settings:
                r = results.get((task, method, setting))
                cells.append(f"{_cell(r['quantized'])} ({_seconds(r)})" if r else
                             ("–" if r == {} else "failed"))  # fmt: skip
            lines.append(f"| {title} | {_cell(done[0]['fp'])} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_section(
    tables: str, results: dict[Key, dict[str, Any] | None], date: str, host: str, marker: str = MARKER,
    command: str = "python benchmarks/glue_table.py",
) -> str:  # fmt: skip
    lines = [tables, "", f"Measured {date} on {host}. Generated by `{command}`."]
    done = {task: r for (task, _, _), r in results.items() if r}
    if done:
        sample = next(iter(done.values()))
        config = sample["qlimit_config"]
        sizes = ", ".join(f"{TASK_NAMES.get(t, t)} {sum(r['eval_samples'].values())}" for t, r in done.items())
        lines.append(
            f"Calibration: {sample['calibration']['num_samples']} train sentences, preset `{config['preset']}` "
            f"({config['iters']} reconstruction iterations per block, batch {config['batch_size']}). "
            f"Dev sentences: {sizes}. Wall time includes the whole quantization."
        )
        gpus = sorted({_gpu(r) for r in results.values() if r and _gpu(r)})
        if gpus:
            lines.append(f"Times marked † were measured on a GPU ({', '.join(gpus)}), several runs sharing it; the "
                         "GPU draws its random numbers (activation samples, QDrop masks) from its own generator, so a GPU cell is "
                         "another sample of the method, not the CPU run's number.")  # fmt: skip
    return _common.section(marker, "\n".join(lines))


def rewrite_readme(readme: Path, section: str, marker: str = MARKER) -> None:
    """Replaces the text from the start marker to the end marker (both included) with `section`."""
    _common.rewrite_between_markers(readme, marker, section)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One tiny run (sst2, RTN W8A8); prints, writes nothing.")
    parser.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--marker", default=MARKER, help="The README markers <!-- MARKER:start/end -->.")
    parser.add_argument(
        "--extra",
        action="extend",
        nargs="*",
        default=[],
        help="More run_glue.py arguments: --extra=--iters=300 --extra=--seed=1",
    )
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="Folder with models/ and data/.")
    parser.add_argument("--out_dir", type=Path, default=REPO / "benchmarks" / "out" / "glue")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--reuse", action="store_true", help="Keep runs that already have a results.json.")
    parser.add_argument("--table_only", action="store_true", help="Run nothing: a table of the existing results.")
    parser.add_argument("--by_method", action="store_true", help="One row per task and method (many methods).")
    parser.add_argument("--write", action="store_true", help="With --quick: rewrite the README all the same.")
    args = parser.parse_args(argv)
    extra: list[str] = list(args.extra)
    if args.quick:
        args.tasks, args.methods, args.settings, extra = (
            QUICK["tasks"],
            QUICK["methods"],
            QUICK["settings"],
            QUICK["extra"],
        )
        args.out_dir = args.out_dir.parent / "glue-quick"
    for path in [args.shared / "models", args.shared / "data" / "glue"]:
        if not path.is_dir():
            raise ValueError(f"{path} does not exist: pass --shared with the folder holding models/ and data/glue/.")

    results: dict[Key, dict[str, Any] | None] = {}
    for task in args.tasks:
        for method in args.methods:
            for setting in args.settings:
                results[task, method, setting] = run_one(
                    task, method, setting, args.shared, args.out_dir, extra, "only" if args.table_only else args.reuse
                )
    build = build_method_tables if args.by_method else build_tables
    tables = build(results, args.tasks, args.methods, args.settings)
    command = "python benchmarks/glue_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    days, threads = _common.measured(results.values())
    section = render_section(tables, results, days, _common.machine(threads), args.marker, command.strip())
    print(section)
    if not args.quick or args.write:
        rewrite_readme(args.readme, section, args.marker)
        print(f"[glue_table] table written to {args.readme}")
    if any(r is None for r in results.values()):
        raise SystemExit("[glue_table] some runs failed; see above.")
    return section


if __name__ == "__main__":
    main()
