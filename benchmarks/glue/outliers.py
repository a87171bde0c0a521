"""Issue 19 ablation: outlier transform x activation-quantizer layout x attention-probability grid, W4A4.

Each cell is one run of examples/glue/run_glue.py in its own process (one torch thread; quantize, save, reload,
evaluate the reloaded model) on the MiniLM-L6 reference models; the table goes between
`<!-- outliers-table:start -->` and `<!-- outliers-table:end -->` of docs/design/outliers.md (`--marker
outliers-table-w8a8` etc. for the other settings) with the machine, the dates, the hf_qlimit commit(s) and the load
average each run started under.

    python -m benchmarks.glue.outliers --tasks stsb sst2 --methods rtn                 # the RTN ablation
    python -m benchmarks.glue.outliers --tasks stsb --methods qdrop --rows 0 5 --reuse  # some QDrop cells
    python -m benchmarks.glue.outliers --table_only                                    # redraw from finished runs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ResultsLog
from benchmarks.glue import table as glue_table

DOC = common.REPO / "docs" / "design" / "outliers.md"
MARKER = "outliers-table"
MODELS = glue_table.MODELS
TASK_NAMES = {"sst2": "SST-2 acc", "mrpc": "MRPC F1", "stsb": "STS-B Pearson"}
METRIC = {"sst2": "accuracy", "mrpc": "f1", "stsb": "pearson"}
METHODS = {"rtn": "RTN", "qdrop": "QDrop", "brecq": "BRECQ"}

# (transforms, act_layout, probabilities, activations): "static" is the paper's per-tensor grid; "p8" 8-bit
# uniform probabilities, "log2" a 4-bit log2 grid; "dynamic" per-token Linear inputs (labelled apart).
ROWS: list[dict[str, Any]] = [
    {"transforms": [], "layout": "per_linear", "probs": "uniform", "acts": "static"},
    {"transforms": [], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["smoothquant"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["os_plus"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["hadamard_down"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["hadamard_inputs"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["os_plus", "hadamard_inputs"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["smoothquant", "hadamard_down"], "layout": "shared", "probs": "uniform", "acts": "static"},
    {"transforms": ["hadamard_inputs"], "layout": "per_linear", "probs": "uniform", "acts": "static"},
    {"transforms": ["hadamard_inputs"], "layout": "shared", "probs": "log2", "acts": "static"},
    {"transforms": ["hadamard_inputs"], "layout": "shared", "probs": "p8", "acts": "static"},
    {"transforms": [], "layout": "shared", "probs": "p8", "acts": "static"},
    {"transforms": [], "layout": "shared", "probs": "uniform", "acts": "dynamic"},
    {"transforms": ["hadamard_inputs"], "layout": "shared", "probs": "p8", "acts": "dynamic"},
    {"transforms": [], "layout": "block_output", "probs": "uniform", "acts": "static"},
    {"transforms": ["hadamard_down"], "layout": "block_output", "probs": "uniform", "acts": "static"},
]


def slug(row: dict[str, Any]) -> str:
    name = "+".join(row["transforms"]) or "none"
    return f"{name}-{row['layout']}-{row['probs']}-{row['acts']}".replace("@", "a")


def row_flags(row: dict[str, Any]) -> list[str]:
    flags = ["--act_layout", row["layout"]]
    if row["transforms"]:
        flags += ["--transforms", *row["transforms"]]
    if row["probs"] == "log2":
        flags += ["--prob_grid", "log2"]
    elif row["probs"] == "p8":
        flags += ["--prob_bits", "8"]
    if row["acts"] == "dynamic":
        flags += ["--act_dynamic", "true"]
    return flags


def run_one(
    task: str,
    method: str,
    setting: tuple[int, int],
    row: dict,
    shared: Path,
    out_dir: Path,
    extra: list[str],
    log: ResultsLog,
) -> dict | None:
    """results.json of one cell (reused as `log` says), {} for one not run, None when the run failed."""
    args = [
        *glue_table.task_flags(task, shared),
        "--method",
        method,
        "--weight_bits",
        str(setting[0]),
        "--act_bits",
        str(setting[1]),
        *common.drop_flags(method),
        "--per_device_eval_batch_size",
        "64",
        *row_flags(row),
        *extra,
    ]
    out = out_dir / task / f"{method}-w{setting[0]}a{setting[1]}" / slug(row)
    return log.run_example("examples/glue/run_glue.py", args, out, f"{task} {method} {slug(row)}")


def _cell(task: str, result: dict | None) -> str:
    if not result:
        return "–"
    value = result["quantized"][next(iter(result["quantized"]))][METRIC[task]] * 100
    return f"{value:.1f} ({result['timings_s']['quantize_s']:.0f} s)"


def _table(rows: list[int], tasks: list[str], methods: list[str], setting: tuple[int, int], results: dict) -> list[str]:
    head = ["#", "Transforms", "Act. quantizers", "Probabilities", "Activations"]
    cols = [(m, t) for m in methods for t in tasks]
    lines = [
        "| " + " | ".join(head + [f"{METHODS[m]} {TASK_NAMES[t]}" for m, t in cols]) + " |",
        "|" + "---|" * len(head) + "---:|" * len(cols),
    ]
    probs = {"uniform": f"uniform {setting[1]}-bit", "p8": "uniform 8-bit", "log2": f"log2 {setting[1]}-bit"}
    acts = {"static": "static per-tensor", "dynamic": "**dynamic per-token**"}
    for i in rows:
        row = ROWS[i]
        cells = [str(i), " + ".join(row["transforms"]) or "none", row["layout"], probs[row["probs"]], acts[row["acts"]]]
        cells += [_cell(t, results.get((t, m, i))) for m, t in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load_text(runs: list[dict]) -> str:
    """The 1-minute load averages the runs started under (older runs recorded all three as a string)."""
    loads = sorted(float(str(r["load_average_at_start"]).split()[0]) for r in runs if r.get("load_average_at_start"))
    text = f"{loads[0]:.1f} to {loads[-1]:.1f}" if loads else "not recorded"
    unrecorded = sum(not r.get("load_average_at_start") for r in runs)
    return text + (f" ({unrecorded} run(s) did not record it)" if unrecorded and loads else "")


def render(rows: list[int], tasks: list[str], methods: list[str], setting: tuple[int, int], results: dict) -> str:
    """The section's body: the settings and FP scores, the table, when and where it was measured."""
    runs = [r for r in results.values() if r]
    days, threads = common.measured(runs)
    commits = sorted({r["environment"].get("versions", {}).get("hf_qlimit", "?") for r in runs})
    iters = sorted({r["qlimit_config"]["iters"] for (_, m, _), r in results.items() if r and m != "rtn"})
    iters_text = (
        f"; {'/'.join(METHODS[m] for m in methods if m != 'rtn')} {'/'.join(map(str, iters))} iterations per block"
        if iters
        else ""
    )
    fps = {
        t: next(
            (r["fp"][next(iter(r["fp"]))][METRIC[t]] * 100 for (tt, _, _), r in results.items() if r and tt == t), None
        )
        for t in tasks
    }
    fp_text = ", ".join(f"{TASK_NAMES[t]} {v:.1f}" for t, v in fps.items() if v is not None)
    setting_flag = "" if setting == (4, 4) else f" --setting {setting[0]} {setting[1]}"
    return "\n".join(
        [
            f"MiniLM-L6 W{setting[0]}A{setting[1]} (first and last layers 8-bit), dev sets; FP: {fp_text}. "
            "Preset `fast` "
            f"(256 calibration sentences{iters_text}). One seed per cell. The wall time is the whole quantization, "
            "transforms included, on a shared CPU.",
            "",
            *_table(rows, tasks, methods, setting, results),
            "",
            f"Measured {days} on {common.machine(threads)}; hf_qlimit commit(s) {', '.join(commits)} (each run's "
            f"`results.json` names its own); 1-minute load average (`uptime`) at the start of the runs: "
            f"{_load_text(runs)}, on 2 cores shared with other jobs. Generated by "
            f"`python -m benchmarks.glue.outliers --tasks {' '.join(tasks)} --methods {' '.join(methods)} --rows "
            f"{' '.join(map(str, rows))}{setting_flag} --table_only`.",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["stsb", "sst2"], choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=["rtn"], choices=sorted(METHODS))
    parser.add_argument("--rows", nargs="+", type=int, default=list(range(len(ROWS))))
    parser.add_argument("--setting", nargs=2, type=int, default=[4, 4], metavar=("W", "A"))
    parser.add_argument("--shared", type=Path, default=common.SHARED)
    parser.add_argument("--out_dir", type=Path, default=common.OUT / "outliers")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument("--table_only", action="store_true", help="draw the table from finished runs only")
    common.add_doc_arguments(parser, DOC, MARKER)
    parser.add_argument("extra", nargs="*", help="after --: more run_glue.py arguments")
    args = parser.parse_args(argv)
    setting = tuple(args.setting)
    # one torch thread per run: the cells' times are compared with each other
    log = ResultsLog("glue.outliers", "only" if args.table_only else args.reuse, env=common.offline_env(1))
    results = {}
    for method in args.methods:
        for i in args.rows:
            for task in args.tasks:
                results[(task, method, i)] = run_one(
                    task, method, setting, ROWS[i], args.shared, args.out_dir, args.extra, log
                )
    body = render(args.rows, args.tasks, args.methods, setting, results)
    section = common.publish(body, args.marker, common.doc_target(args), "glue.outliers")
    log.check()
    return section


if __name__ == "__main__":
    main()
