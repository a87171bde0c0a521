"""What the benchmark scripts share: a description of the machine, when and with how many threads their runs
were measured, and a README section between two markers.

The scripts put this folder on `sys.path` and `import _common`, which works when they run as
`python benchmarks/<script>.py` and when the tests load them from their file.

A section is the text from `<!-- MARKER:start -->` to `<!-- MARKER:end -->`, both markers included; rewriting a
README replaces it, so that a rerun never appends a second table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def commit(repo: Path) -> str:
    """The checked-out commit of `repo`, with "+local changes" when hf_qlimit/ differs from it; "unknown" without
    git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "hf_qlimit"], capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
        return (out.stdout.strip() or "unknown") + ("+local changes" if dirty else "")
    except OSError:
        return "unknown"


def markers(marker: str) -> tuple[str, str]:
    """The start and end markers of a section: `<!-- MARKER:start -->`, `<!-- MARKER:end -->`."""
    return f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"


def section(marker: str, body: str) -> str:
    """`body` between the two markers, each on its own line."""
    start, end = markers(marker)
    return f"{start}\n{body}\n{end}"


def replace_between_markers(text: str, marker: str, section: str, where: str = "The text") -> str:
    """`text` with its section of `marker` (markers included) replaced by `section`.

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
    return text[:start] + section + text[end + len(end_tag) :]


def rewrite_between_markers(readme: Path, marker: str, section: str) -> None:
    """Replaces the section of `marker` in the file `readme` (markers included) by `section`."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    readme.write_text(replace_between_markers(text, marker, section, where=str(readme)), encoding="utf-8")


def read_results(path: Path) -> dict[str, Any]:
    """A run's results.json, its date filled from the file's time where the run did not record it (older runs)."""
    path = Path(path)
    results = json.loads(path.read_text())
    environment = results.setdefault("environment", {})
    if "date" not in environment:
        environment["date"] = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat()
    return results


def drop_flags(method: str) -> list[str]:
    """QDrop's dropping stated for "qdrop" (the `fast` preset otherwise turns it off); nothing for the others."""
    return ["--drop_prob", "0.5"] if method == "qdrop" else []


def method_flags(method: str) -> list[str]:
    """The example scripts' flags for `method`; "default" passes none (QLimitConfig's defaults decide)."""
    return [] if method == "default" else ["--method", method, *drop_flags(method)]


def measured(runs: Iterable[dict[str, Any] | None]) -> tuple[str, int | str | None]:
    """('<first day>[ to <last day>]', the CPU runs' torch threads: one count, or '<fewest> to <most>' when they
    differ, None when none recorded it) of results read by `read_results` (None or empty: a failed or missing run)."""
    runs = [r for r in runs if r]
    days = sorted({r["environment"]["date"][:10] for r in runs}) or [datetime.date.today().isoformat()]
    threads = {r["environment"]["torch_threads"] for r in runs if r["environment"].get("torch_threads")}
    span = (f"{min(threads)} to {max(threads)}" if len(threads) > 1 else threads.pop()) if threads else None
    return (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"), span
