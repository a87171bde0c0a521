"""GLUE method tables: examples/glue/run_glue.py on the MiniLM-L6 reference models, one process per run.

For sst2, mrpc and stsb (models from ../shared/models/minilm-l6-<task>, data from ../shared/data/glue), each
method (RTN, QDrop) and each setting (W8A8, W4A8, W2A8), runs the script in its own process, collects the
`results.json` files and rewrites the table between `<!-- glue-table:start -->` and `<!-- glue-table:end -->` of
docs/results/glue.md (`--marker` names another of its tables: recon-table, recon-table-default, ...), with the
machine and the date.

    python -m benchmarks.glue.table                 # everything: hours on a laptop CPU
    python -m benchmarks.glue.table --reuse         # only the runs without a results.json yet
    python -m benchmarks.glue.table --quick         # one tiny run (sst2, RTN W8A8, 64 dev sentences), printed only
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ResultsLog

DOC = common.RESULTS_DOCS / "glue.md"
MARKER = "glue-table"
START, END = common.markers(MARKER)
RUN_GLUE = "examples/glue/run_glue.py"

MODELS = {"sst2": "minilm-l6-sst2", "mrpc": "minilm-l6-mrpc", "stsb": "minilm-l6-stsb"}
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B"}
# "Default": no --method, so whatever QLimitConfig's defaults resolve to (`common.method_flags`).
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
Results = dict[Key, dict[str, Any] | None]  # None: a failed run; {}: one not measured (--table_only)


def task_flags(task: str, shared: Path) -> list[str]:
    """run_glue.py's reference model, task and data flags for `task`."""
    return [
        "--model_name_or_path",
        str(shared / "models" / MODELS[task]),
        "--task_name",
        task,
        "--data_dir",
        str(shared / "data" / "glue"),
    ]


def run_one(task: str, method: str, setting: str, shared: Path, out_dir: Path, extra: list[str], log: ResultsLog):
    """results.json of one run (reused as `log` says), {} for one not run, None when the run failed."""
    weight_bits, act_bits = SETTINGS[setting]
    args = [
        *task_flags(task, shared),
        *common.method_flags(METHODS[method]),
        "--weight_bits",
        str(weight_bits),
        "--act_bits",
        str(act_bits),
        "--per_device_eval_batch_size",
        "64",
        *extra,
    ]
    out = out_dir / task / f"{METHODS[method]}-{setting.lower()}"
    return log.run_example(RUN_GLUE, args, out, f"{task} {method} {setting}")


def gpu(result: dict[str, Any]) -> str | None:
    """The GPU a run quantized on, or None for a CPU run (results without `environment` predate GPU runs)."""
    return (result.get("environment") or {}).get("gpu")


def _seconds(result: dict[str, Any]) -> str:
    """Quantization wall time; † marks a GPU run, whose time is not comparable with the CPU ones."""
    return f"{result['timings_s']['quantize_s']:.0f} s" + (" †" if gpu(result) else "")


def metric_cell(metrics: dict[str, dict[str, float]]) -> str:
    """Every metric of every split, in percent: '78.4/85.4'."""
    return "/".join(f"{100 * v:.1f}" for split in metrics.values() for v in split.values())


def _metric_label(metrics: dict[str, dict[str, float]]) -> str:
    names = [METRIC_NAMES.get(name, name) for split in metrics.values() for name in split]
    return "/".join(names)


def _missing(result: dict[str, Any] | None) -> str:
    return "–" if result == {} else "failed"


def build_tables(results: Results, tasks: list[str], methods: list[str], settings: list[str]) -> str:
    """Markdown: a metric table (FP and each method x setting) and a table of quantization times."""
    columns = [(m, s) for m in methods for s in settings]
    tasks = [t for t in tasks if any(results.get((t, m, s)) for m, s in columns)]  # nothing measured: no row
    head = "| " + " | ".join(f"{m} {s}" for m, s in columns) + " |"
    metric_rows, time_rows = [], []
    for task in tasks:
        runs = [results.get((task, m, s)) for m, s in columns]
        done = [r for r in runs if r]
        fp = metric_cell(done[0]["fp"]) if done else "–"
        label = _metric_label(done[0]["fp"]) if done else ""
        cells = [metric_cell(r["quantized"]) if r else _missing(r) for r in runs]
        metric_rows.append(f"| {TASK_NAMES.get(task, task)} ({label}) | {fp} | " + " | ".join(cells) + " |")
        times = [_seconds(r) if r else "–" for r in runs]
        time_rows.append(f"| {TASK_NAMES.get(task, task)} | " + " | ".join(times) + " |")
    times_table = ["Quantization time:", "", "| Task " + head, "|---|" + "---:|" * len(columns), *time_rows]
    return "\n".join(
        ["| Task (metric) | FP " + head, "|---|---|" + "---:|" * len(columns), *metric_rows, "", *times_table]
    )


def build_method_tables(results: Results, tasks: list[str], methods: list[str], settings: list[str]) -> str:
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
            runs = [results.get((task, method, setting)) for setting in settings]
            cells = [f"{metric_cell(r['quantized'])} ({_seconds(r)})" if r else _missing(r) for r in runs]
            lines.append(f"| {title} | {metric_cell(done[0]['fp'])} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(tables: str, results: Results, date: str, host: str, command: str) -> str:
    """The section's body: the tables, then when, where and how they were measured."""
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
        gpus = sorted({gpu(r) for r in results.values() if r and gpu(r)})
        if gpus:
            lines.append(
                f"Times marked † were measured on a GPU ({', '.join(gpus)}), several runs sharing it; the "
                "GPU draws its random numbers (activation samples, QDrop masks) from its own generator, so a "
                "GPU cell is another sample of the method, not the CPU run's number."
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One tiny run (sst2, RTN W8A8); prints, writes nothing.")
    parser.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument(
        "--extra",
        action="extend",
        nargs="*",
        default=[],
        help="More run_glue.py arguments: --extra=--iters=300 --extra=--seed=1",
    )
    parser.add_argument("--shared", type=Path, default=common.SHARED, help="Folder with models/ and data/.")
    parser.add_argument("--out_dir", type=Path, default=common.OUT / "glue")
    common.add_doc_arguments(parser, DOC, MARKER)
    parser.add_argument("--reuse", action="store_true", help="Keep runs that already have a results.json.")
    parser.add_argument("--table_only", action="store_true", help="Run nothing: a table of the existing results.")
    parser.add_argument("--by_method", action="store_true", help="One row per task and method (many methods).")
    parser.add_argument("--write", action="store_true", help="With --quick: write the doc page all the same.")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.methods, args.settings = QUICK["tasks"], QUICK["methods"], QUICK["settings"]
        args.extra = QUICK["extra"]
        args.out_dir = args.out_dir.parent / "glue-quick"
    for path in [args.shared / "models", args.shared / "data" / "glue"]:
        if not path.is_dir():
            raise ValueError(f"{path} does not exist: pass --shared with the folder holding models/ and data/glue/.")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    log = ResultsLog("glue.table", "only" if args.table_only else args.reuse)
    results: Results = {
        (task, method, setting): run_one(task, method, setting, args.shared, args.out_dir, args.extra, log)
        for task, method, setting in itertools.product(args.tasks, args.methods, args.settings)
    }
    build = build_method_tables if args.by_method else build_tables
    days, threads = common.measured(results.values())
    body = render(
        build(results, args.tasks, args.methods, args.settings),
        results,
        days,
        common.machine(threads),
        common.command("benchmarks.glue.table", argv),
    )
    doc = None if args.quick and not args.write else common.doc_target(args)
    section = common.publish(body, args.marker, doc, "glue.table")
    log.check()
    return section


if __name__ == "__main__":
    main()
