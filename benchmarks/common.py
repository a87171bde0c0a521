"""What the benchmark scripts share: where things are, what machine measured and when, how a run is launched and
its result kept (`ResultsLog`), and how a table reaches its doc page (`publish`).

Every script runs as a module from the repository root, `python -m benchmarks.<subject>.<script>`, so that
`benchmarks` and `hf_qlimit` import from the checkout without any path edits.

A doc section is the text from `<!-- MARKER:start -->` to `<!-- MARKER:end -->`, both markers included; writing a
table replaces it, so that a rerun never appends a second table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # models/ and data/ of the reference runs, beside the checkout
OUT = REPO / "benchmarks" / "out"  # what the runs write (git-ignored)
RESULTS_DOCS = REPO / "docs" / "results"  # the pages the tables are written into
RESULT = "RESULT "  # the stdout prefix of a child process's record (`emit_result`, `ResultsLog.run_child`)

Record = dict[str, Any]
Reuse = bool | Literal["only"]


# ----------------------------------------------------------------------------------------------- machine and time


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, more telling than the architecture), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | str | None = None) -> str:
    """'<platform>, <CPU>, <n> CPUs, torch <version> (<threads> threads)[, GPU <name>]'.

    `threads`: what the measured processes used, where that is not this process's torch setting."""
    import torch  # here, so that a script's --help is quick

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    torch_info = f"torch {torch.__version__} ({threads or torch.get_num_threads()} threads)"
    return f"{platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs, {torch_info}{gpu}"


def commit(repo: Path = REPO) -> str:
    """The checked-out commit of `repo`, with "+local changes" when hf_qlimit/ differs from it; "unknown" without
    git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        status = ["git", "-C", str(repo), "status", "--porcelain", "hf_qlimit"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+local changes" if dirty else "")
    except OSError:
        return "unknown"


def load_average() -> float:
    """The 1-minute load average, NaN where the platform has none: the machines are shared, so every run records
    what it competed with."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def add_commit(path: Path, commit: str) -> Record:
    """Records in a fresh run's results.json the commit it started on (the example scripts do not), and reads it
    back with `read_results`."""
    results = json.loads(Path(path).read_text())
    results["commit"] = commit
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    return read_results(path)


def read_results(path: Path) -> Record:
    """A run's results.json, its date filled from the file's time where the run did not record it (older runs)."""
    path = Path(path)
    results = json.loads(path.read_text())
    environment = results.setdefault("environment", {})
    if "date" not in environment:
        environment["date"] = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat()
    return results


def measured(runs: Iterable[Record | None]) -> tuple[str, int | str | None]:
    """('<first day>[ to <last day>]', the CPU runs' torch threads: one count, or '<fewest> to <most>' when they
    differ, None when none recorded it) of results read by `read_results` (None or empty: a failed or missing run)."""
    runs = [r for r in runs if r]
    threads = {r["environment"]["torch_threads"] for r in runs if r["environment"].get("torch_threads")}
    span = (f"{min(threads)} to {max(threads)}" if len(threads) > 1 else threads.pop()) if threads else None
    return day_span(r["environment"]["date"] for r in runs), span


def day_span(dates: Iterable[str]) -> str:
    """'<day>' or '<first day> to <last day>' of ISO dates or timestamps; today where there are none."""
    days = sorted({date[:10] for date in dates}) or [datetime.date.today().isoformat()]
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


# ----------------------------------------------------------------------------------------------- command lines


def drop_flags(method: str) -> list[str]:
    """QDrop's dropping stated for "qdrop" (its default too, said on the command line so the table's command
    reproduces it whatever the default becomes); nothing for the others."""
    return ["--drop_prob", "0.5"] if method == "qdrop" else []


def method_flags(method: str) -> list[str]:
    """The example scripts' flags for `method`; "default" passes none (QLimitConfig's defaults decide)."""
    return [] if method == "default" else ["--method", method, *drop_flags(method)]


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces a table, for its footer: `python -m <module> <argv>` (None: this process's)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def offline_env(threads: int = 1) -> dict[str, str]:
    """Environment of a measured child run: `threads` CPU threads, no network (the models and data are local)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def load_example(path: str) -> ModuleType:
    """The example script at `path` (from the repository root, e.g. "examples/language-modeling/run_ppl.py")
    imported by its file, once, under its file name: the examples are scripts in dashed folders, not a package."""
    file = (REPO / path).resolve()
    module = sys.modules.get(file.stem)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == file:
        return module
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- runs and results


def read_jsonl(path: Path) -> list[Record]:
    """Every record of a JSON lines file in file order; none when it does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def emit_result(record: Record) -> None:
    """A child process's answer to `ResultsLog.run_child`: one stdout line, whatever else the run printed."""
    print(RESULT + json.dumps(record), flush=True)


class ResultsLog:
    """A benchmark's runs, each in its own process (its own threads, memory and failure), and the records they left.

    Records stay where the scripts always kept them: the `results.json` an example script writes into its run's
    folder (`run_example`), or a JSON lines file, `results`, one line per record (`run_child`, `append`), of which
    `records` keeps the newest per key, so that a rerun replaces its cell while the file keeps the history.

    `reuse`: False runs everything; True keeps a run that has a results.json already; "only" runs nothing, and a run
    without one is {} (a blank cell; None is a failed run). A failed run costs no other run: it is named in `failed`,
    and `check()` exits non-zero once the table is written.
    """

    def __init__(
        self, tag: str, reuse: Reuse = False, env: dict[str, str] | None = None, results: Path | None = None
    ) -> None:
        self.tag, self.reuse, self.results = tag, reuse, results
        self.env = {**os.environ, **(env or {})}
        self.failed: list[str] = []

    def log(self, message: str, file: Any = None) -> None:
        print(f"[{self.tag}] {message}", file=file or sys.stdout, flush=True)

    def run_example(self, script: str, args: list[str], out_dir: Path, label: str) -> Record | None:
        """`<out_dir>/results.json` of `python <script> --output_dir <out_dir> <args>` (`script` from the repository
        root), with the load average the run started under added to it."""
        path = Path(out_dir) / "results.json"
        if self.reuse and path.is_file():
            return read_results(path)
        if self.reuse == "only":  # the table of what was measured: a missing run is a blank cell, not a new run
            return {}
        cmd = [sys.executable, str(REPO / script), "--output_dir", str(out_dir), *args]
        load = self._start(label, cmd)
        if subprocess.run(cmd, check=False, env=self.env).returncode != 0 or not path.is_file():
            self._fail(label)
            return None
        results = json.loads(path.read_text())
        results["load_average_at_start"] = load
        path.write_text(json.dumps(results, indent=2) + "\n")
        return read_results(path)

    def run_child(self, args: list[str], label: str) -> Record | None:
        """The record a `python <args>` child printed with `emit_result`, appended to `results`; its other output
        goes through."""
        cmd = [sys.executable, *args]
        self._start(label, cmd)
        proc = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], end="")
            self._fail(label)
            return None
        record = json.loads(line[len(RESULT) :])
        self.append(record)
        return record

    def append(self, record: Record) -> None:
        """Adds `record` to the results file as soon as it is measured: a later crash loses no finished run."""
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, key: Callable[[Record], Hashable]) -> dict[Hashable, Record]:
        """The newest record of each `key` in the results file."""
        return {key(r): r for r in read_jsonl(self.results)}

    def check(self) -> None:
        """Exits non-zero, naming them, when runs failed."""
        if self.failed:
            raise SystemExit(f"[{self.tag}] {len(self.failed)} run(s) failed: {', '.join(self.failed)}; see above.")

    def _start(self, label: str, cmd: list[str]) -> float:
        load = load_average()
        self.log(f"{label} (load {load:.2f}): {shlex.join(cmd)}")
        return load

    def _fail(self, label: str) -> None:
        self.log(f"FAILED: {label}", file=sys.stderr)
        self.failed.append(label)


# ----------------------------------------------------------------------------------------------- doc pages


def markers(marker: str) -> tuple[str, str]:
    """The start and end markers of a section: `<!-- MARKER:start -->`, `<!-- MARKER:end -->`."""
    return f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"


def section(marker: str, body: str) -> str:
    """`body` between the two markers, each on its own line."""
    start, end = markers(marker)
    return f"{start}\n{body}\n{end}"


def replace_between_markers(text: str, marker: str, new_section: str, where: str = "The text") -> str:
    """`text` with its section of `marker` (markers included) replaced by `new_section`.

    Raises `ValueError` naming the markers that are missing (`where` names the text in the message).
    """
    start_tag, end_tag = markers(marker)
    start = text.find(start_tag)
    end = text.find(end_tag, start + len(start_tag)) if start >= 0 else text.find(end_tag)
    if start < 0 and end < 0:
        raise ValueError(f"{where} lacks the markers {start_tag} and {end_tag} (the table goes between them).")
    if start < 0:
        raise ValueError(
            f"{where} lacks the start marker {start_tag} before {end_tag} (the table goes between the markers)."
        )
    if end < 0:
        raise ValueError(
            f"{where} lacks the end marker {end_tag} after {start_tag} (the table goes between the markers)."
        )
    return text[:start] + new_section + text[end + len(end_tag) :]


def write_section(doc: Path, marker: str, body: str) -> None:
    """Replaces the section of `marker` in the page `doc` (markers included) by `body` between the markers."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")
    doc.write_text(replace_between_markers(text, marker, section(marker, body), where=str(doc)), encoding="utf-8")


def publish(body: str, marker: str, doc: Path | None, tag: str) -> str:
    """Prints the table `body` between its markers and writes it into `doc` (None: print only); the section."""
    text = section(marker, body)
    print(text)
    if doc is not None:
        write_section(doc, marker, body)
        print(f"[{tag}] table written to {doc}", flush=True)
    return text


def add_doc_arguments(
    parser: argparse.ArgumentParser, default: Path | None, marker: str | None = None, default_text: str | None = None
) -> None:
    """`--doc PATH` (alias `--readme`): the page the table goes into; `--no_doc` (alias `--no_readme`): print only;
    with `marker`, `--marker`: another section of that page (another table of the same script). `default_text`
    says what the default is where the script resolves it later (None here)."""
    where = default_text or ("nowhere" if default is None else os.path.relpath(default, REPO))
    parser.add_argument(
        "--doc",
        "--readme",
        dest="doc",
        type=Path,
        default=default,
        metavar="PATH",
        help=f"Page the table is written into, between its markers (default: {where}).",
    )
    parser.add_argument("--no_doc", "--no_readme", dest="no_doc", action="store_true", help="Print the table only.")
    if marker is not None:
        parser.add_argument("--marker", default=marker, help="The page's section <!-- MARKER:start/end --> to write.")


def doc_target(args: argparse.Namespace) -> Path | None:
    """The page `add_doc_arguments`' flags name, None for print only."""
    return None if args.no_doc else args.doc
