"""hf_qlimit against other quantization tools: one command runs every (tool, model, setting) and writes the table.

    bash benchmarks/peers/install_peers.sh        # once: one virtual environment per peer (optional extras)
    python -m benchmarks.peers.run                # every run not measured yet, then the table in docs/results/peers.md
    python -m benchmarks.peers.run --quick        # MiniLM W4A16 g128 only, 5 iterations: checks the chain, prints
    python -m benchmarks.peers.run --table_only   # redraw the table from the results measured so far

Each run is a subprocess (`python -m benchmarks.peers.worker`, from the repository root) under the tool's own
interpreter (`--python TOOL=PATH`; default
`<venv_root>/<tool>/bin/python` when it exists, else this interpreter), one CPU thread. A run's record (status,
metric, calibration wall time, peak RSS of the process from wait4, checkpoint size) is appended to
`benchmarks/out/peers/results.jsonl`; the table (`benchmarks.peers.table`) takes the newest record of each (tool,
model, setting). A tool that cannot be imported, installed or run gets a row with its one-line error, never no row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import REPO, ResultsLog
from benchmarks.peers import peer_eval
from benchmarks.peers.table import FP_TOOL, TOOL_BY_NAME, TOOLS, Tool, key, load_records, render

OUT = common.OUT / "peers"
DOC = common.RESULTS_DOCS / "peers.md"
MARKER = "peers-table"
DEFAULT_ITERS = {"minilm-sst2": 500, "smollm2": 20}


def interpreter(module: str, overrides: dict[str, str], venv_root: Path) -> tuple[str, str | None]:
    """(python to run the tool with, why it is missing or None)."""
    if module in overrides:
        path = overrides[module]
        return path, None if Path(path).exists() else f"interpreter {path} does not exist"
    if module == "hf_qlimit":
        return sys.executable, None
    venv = venv_root / module / "bin" / "python"
    return (str(venv), None) if venv.exists() else (sys.executable, None)


def install_error(module: str, venv_root: Path) -> str | None:
    """The install log's verdict for a peer whose install failed (`install_peers.sh` writes `<tool>.log`)."""
    log = venv_root / "logs" / f"{module}.log"
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    if lines and lines[-1].strip() == "rc=0":
        return None
    errors = [line.strip() for line in lines if line.startswith("ERROR") or "error:" in line.lower()]
    return "install failed: " + (errors[0] if errors else (lines[-1] if lines else "empty log"))[:300]


def worker_command(
    tool: Tool, model: str, setting: str, python: str, iters: int | None, ckpt_dir: Path, result_file: Path
) -> list[str]:
    """The worker's command line: `python -m benchmarks.peers.worker` with the run's tool, model and setting."""
    cmd = [
        python,
        "-m",
        "benchmarks.peers.worker",
        "--tool",
        tool.module,
        "--algo",
        tool.algo,
        "--model",
        model,
        "--setting",
        setting,
        "--out_dir",
        str(ckpt_dir),
        "--result",
        str(result_file),
    ]
    if iters is not None:
        cmd += ["--iters", str(iters)]
    return cmd


def run_job(
    tool: Tool, model: str, setting: str, python: str, iters: int | None, timeout: float, out: Path
) -> dict[str, Any]:
    """Runs the worker under `python` and returns its record; a crash, a kill or a timeout becomes an error record.

    The worker runs as a module from the repository root, which is also put on PYTHONPATH: the tool's interpreter
    does not have this checkout installed, and finds `benchmarks` and `hf_qlimit` there."""
    slug = f"{tool.module}-{tool.algo}-{model}-{setting}".replace(" ", "_").lower()
    result_file, log_file = out / "results" / f"{slug}.json", out / "logs" / f"{slug}.log"
    for folder in (result_file.parent, log_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = worker_command(tool, model, setting, python, iters, out / "ckpt" / slug, result_file)
    python_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, **common.offline_env(1), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": python_path}
    print(f"[peers] {tool.name} | {model} | {setting}: {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    record: dict[str, Any] = {"status": "error"}
    if result_file.is_file():
        record = json.loads(result_file.read_text())
    elif wall >= timeout:
        record["error"] = f"timeout: killed after {timeout:.0f} s"
    else:
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        record["error"] = f"worker exited {proc.returncode}: " + (tail[-1][:280] if tail else "no output")
    record.update(
        tool=tool.name,
        model=model,
        setting=setting,
        iters=iters,
        python=python,
        wall_s=wall,
        peak_rss_mb_wait4=usage.ru_maxrss / 1024,
        date=datetime.date.today().isoformat(),
        log=str(log_file),
    )
    print(f"[peers]   -> {record['status']} {record.get('metric', '')} {record.get('error', '')}", flush=True)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(peer_eval.SETTINGS), choices=list(peer_eval.SETTINGS))
    parser.add_argument(
        "--tools",
        nargs="+",
        default=[t.name for t in TOOLS],
        choices=[t.name for t in TOOLS],
        metavar="TOOL",
        help=f"Rows to run, of: {[t.name for t in TOOLS]}.",
    )
    parser.add_argument("--settings", nargs="+", default=None, help="Only these setting labels (e.g. 'W4A16 g128').")
    parser.add_argument("--python", nargs="*", default=[], metavar="TOOL=PATH", help="Interpreter of a tool module.")
    parser.add_argument("--venv_root", type=Path, default=Path(os.environ.get("PEERS_VENVS", OUT / "venvs")))
    parser.add_argument(
        "--iters",
        nargs="*",
        default=[],
        metavar="MODEL=N",
        help=f"hf_qlimit BRECQ/QDrop iterations per block; default {DEFAULT_ITERS}.",
    )
    parser.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    parser.add_argument("--rerun", action="store_true", help="Run again what has a record already.")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="Seconds before a run is killed.")
    parser.add_argument("--table_only", action="store_true", help="Run nothing; redraw the table.")
    parser.add_argument("--quick", action="store_true", help="MiniLM W4A16 g128, 5 iterations; prints only.")
    common.add_doc_arguments(parser, DOC, MARKER)  # another marker draws one sitting's table (`main`)
    args = parser.parse_args(argv)
    args.overrides = dict(item.split("=", 1) for item in args.python)
    args.iters = {**DEFAULT_ITERS, **{m: int(n) for m, n in (item.split("=", 1) for item in args.iters)}}
    if args.quick:
        args.models, args.settings, args.iters = ["minilm-sst2"], ["W4A16 g128"], {"minilm-sst2": 5}
        args.results = OUT / "quick.jsonl"
    return args


def run_all(args: argparse.Namespace, tools: list[Tool]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every (tool, model, setting) of `args` without a usable record yet, each record appended as it ends."""
    log = ResultsLog("peers", results=args.results)
    records = load_records(args.results)
    for model in args.models:
        jobs = [(FP_TOOL, peer_eval.FP.label)] + [
            (tool, setting)
            for setting in peer_eval.SETTINGS[model]
            for tool in tools
            if model in tool.models
            if args.settings is None or setting in args.settings
        ]
        for tool, setting in jobs:
            n = args.iters[model] if tool.reconstructs else None
            old = records.get((tool.name, model, setting))
            if old is not None and not args.rerun and old.get("status") != "error" and old.get("iters") == n:
                continue
            python, missing = interpreter(tool.module, args.overrides, args.venv_root)
            problem = missing or install_error(tool.module, args.venv_root)
            if problem:  # a row all the same, with the reason
                record = {
                    "status": "error",
                    "error": problem,
                    "tool": tool.name,
                    "model": model,
                    "setting": setting,
                    "iters": n,
                    "date": datetime.date.today().isoformat(),
                }
            else:
                args.results.parent.mkdir(parents=True, exist_ok=True)
                record = run_job(tool, model, setting, python, n, args.timeout, args.results.parent)
            log.append(record)
            records[key(record)] = record
    return records


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    tools = [TOOL_BY_NAME[name] for name in args.tools]
    records = load_records(args.results) if args.table_only else run_all(args, tools)
    if args.quick:
        return common.publish(render(records, args.models, tools), args.marker, None, "peers")
    # the whole table, whatever this call ran; re-read, another run may have appended meanwhile. Another marker
    # than the default draws only --models, and only the tools with a record in --results (one sitting's table).
    sitting = args.marker != MARKER
    models = args.models if sitting else list(peer_eval.SETTINGS)
    body = render(load_records(args.results), models, TOOLS, only_run=sitting)
    return common.publish(body, args.marker, common.doc_target(args), "peers")


if __name__ == "__main__":
    main()
