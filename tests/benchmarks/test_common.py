"""benchmarks.common and the package's layout: runs kept and reused, failed runs counted, sections written
between markers, commands that name real modules, no script editing sys.path."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.common import ResultsLog

PACKAGE = common.REPO / "benchmarks"


class _Done:
    def __init__(self, returncode: int = 0, stdout: str = "") -> None:
        self.returncode, self.stdout = returncode, stdout


def test_run_example_reuses_runs_records_the_load_and_counts_failures(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):  # an example script: writes results.json into its --output_dir
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        if "--fail" in cmd:
            return _Done(1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"metric": 1.0, "environment": {"date": "2026-01-01"}}))
        return _Done(0)

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    log = ResultsLog("test", env={"OMP_NUM_THREADS": "1"})
    result = log.run_example("examples/glue/run_glue.py", ["--task_name", "sst2"], tmp_path / "a", "a")
    assert result["metric"] == 1.0 and "load_average_at_start" in result
    assert calls[0][1] == str(common.REPO / "examples" / "glue" / "run_glue.py")
    assert log.run_example("examples/glue/run_glue.py", ["--fail"], tmp_path / "b", "b") is None
    assert log.failed == ["b"]
    with pytest.raises(SystemExit, match="1 run"):
        log.check()

    reuse = ResultsLog("test", reuse=True)
    assert reuse.run_example("x.py", [], tmp_path / "a", "a")["metric"] == 1.0 and len(calls) == 2  # not rerun
    only = ResultsLog("test", reuse="only")
    assert only.run_example("x.py", [], tmp_path / "c", "c") == {} and len(calls) == 2  # a blank cell, no run
    only.check()  # a run not made is no failure


def test_run_child_appends_its_result_line_and_the_newest_record_wins(tmp_path, monkeypatch):
    outputs = iter(
        [
            _Done(0, 'progress\nRESULT {"variant": "a", "ppl": 2.0}\n'),
            _Done(1, "Traceback\n"),
            _Done(0, 'RESULT {"variant": "a", "ppl": 3.0}\n'),
            _Done(0, "no result line\n"),
        ]
    )
    monkeypatch.setattr(common.subprocess, "run", lambda cmd, **kwargs: next(outputs))
    log = ResultsLog("test", results=tmp_path / "out" / "results.jsonl")
    assert log.run_child(["-m", "x"], "first") == {"variant": "a", "ppl": 2.0}
    assert log.run_child(["-m", "x"], "crash") is None
    assert log.run_child(["-m", "x"], "rerun")["ppl"] == 3.0
    assert log.run_child(["-m", "x"], "silent") is None
    assert log.failed == ["crash", "silent"]
    assert [r["ppl"] for r in common.read_jsonl(log.results)] == [2.0, 3.0]  # the file keeps the history
    assert log.records(lambda r: r["variant"]) == {"a": {"variant": "a", "ppl": 3.0}}
    assert common.read_jsonl(tmp_path / "missing.jsonl") == []


def test_emit_result_is_what_run_child_reads(capsys):
    common.emit_result({"x": 1})
    line = capsys.readouterr().out
    assert line.startswith(common.RESULT) and json.loads(line[len(common.RESULT) :]) == {"x": 1}


def test_sections_between_markers(tmp_path, capsys):
    doc = tmp_path / "page.md"
    doc.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\n<!-- u:start -->\nkeep\n<!-- u:end -->\n")
    section = common.publish("new", "t", doc, "test")
    assert section == "<!-- t:start -->\nnew\n<!-- t:end -->" and section in capsys.readouterr().out
    assert doc.read_text() == "intro\n<!-- t:start -->\nnew\n<!-- t:end -->\n<!-- u:start -->\nkeep\n<!-- u:end -->\n"
    common.publish("print only", "t", None, "test")
    assert "print only" not in doc.read_text()
    cases = [("no markers", "markers"), ("<!-- t:end -->", "start marker"), ("<!-- t:start -->", "end marker")]
    for text, missing in cases:
        with pytest.raises(ValueError, match=missing):
            common.replace_between_markers(text, "t", "x")


def test_doc_arguments_and_commands():
    parser = argparse.ArgumentParser()
    common.add_doc_arguments(parser, common.RESULTS_DOCS / "x.md", "m")
    args = parser.parse_args([])
    assert common.doc_target(args) == common.RESULTS_DOCS / "x.md" and args.marker == "m"
    assert common.doc_target(parser.parse_args(["--readme", "a.md"])) == Path("a.md")  # the old name still works
    assert common.doc_target(parser.parse_args(["--doc", "a.md", "--no_readme"])) is None
    assert common.command("benchmarks.lm.ablation", ["--settings", "W3A16 g64"]) == (
        "python -m benchmarks.lm.ablation --settings 'W3A16 g64'"
    )
    assert common.method_flags("default") == [] and common.method_flags("qdrop")[-2:] == ["--drop_prob", "0.5"]


def test_load_example_imports_a_script_once(tmp_path):
    script = tmp_path / "example_script_for_test.py"
    script.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass A:\n    x: int = 1\n")
    module = common.load_example(str(script))
    assert module.A().x == 1 and common.load_example(str(script)) is module


def _scripts() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_script_edits_sys_path():
    """The scripts run as modules from the repository root; a path edit would hide a broken import."""
    offenders = [str(p.relative_to(common.REPO)) for p in _scripts() if "sys.path" in p.read_text()]
    assert offenders == []


def test_every_command_named_in_the_scripts_exists():
    """Docstrings and table footers print `python -m benchmarks...` commands: each must name a real module."""
    commands = {m for p in _scripts() for m in re.findall(r"python -m (benchmarks(?:\.\w+)+)", p.read_text())}
    assert len(commands) >= 15
    assert sorted(m for m in commands if importlib.util.find_spec(m) is None) == []


@pytest.mark.slow
def test_a_script_runs_as_a_module_from_the_repository_root():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm.ablation", "--help"],
        cwd=common.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "--doc PATH, --readme PATH" in run.stdout


# Each script's default page and the sections of it the script writes (`--marker` picks one of several).
PAGES = {
    "benchmarks.glue.table": (
        "results/glue.md",
        ["glue-table", "recon-table-default", "recon-timing", "recon-timing-32", "recon-table-margin", "recon-table"],
    ),
    "benchmarks.glue.seed_study": ("results/glue.md", ["seed-study", "seed-study-stsb", "seed-study-stsb-200"]),
    "benchmarks.glue.recon_overhead": ("results/glue.md", ["recon-overhead"]),
    "benchmarks.glue.outliers": (
        "design/outliers.md",
        ["outliers-table", "outliers-table-w8a8", "outliers-table-w4a8"],
    ),
    "benchmarks.glue.convergence": ("design/short-budget-schedule.md", ["convergence-table"]),
    "benchmarks.glue.mixed_precision": ("results/mixed-precision.md", ["mixed-table"]),
    "benchmarks.glue.draws": ("results/glue.md", ["default-draws"]),
    "benchmarks.squad.table": (
        "results/squad.md",
        [
            "squad-table",
            "squad-brecq",
            "squad-default",
            "squad-outliers",
            "squad-defaults-32",
            "squad-w2a8-fisher",
            "squad-w2a8-rotations",
        ],
    ),
    "benchmarks.lm.w8a8_probs": ("results/language-modeling.md", ["w8a8-probs", "w8a8-defaults"]),
    "benchmarks.lm.table": ("results/language-modeling.md", ["causal-lm-table"]),
    "benchmarks.lm.ablation": ("results/language-modeling.md", ["lm-ablation-table", "lm-ablation-a8"]),
    "benchmarks.lm.attention_sink": ("results/language-modeling.md", ["attention-sink-table"]),
    "benchmarks.lm.proxy": ("results/language-modeling.md", ["lm-proxy-table"]),
    "benchmarks.lm.mixed_precision": ("results/mixed-precision.md", ["mixed-lm-table"]),
    "benchmarks.peers.run": ("results/peers.md", ["peers-table", "peers-table-smollm2"]),
    "benchmarks.deploy.packed": ("results/deploy.md", ["deploy-table"]),
    "benchmarks.deploy.offload": ("results/offload.md", ["offload-table"]),
}


@pytest.mark.parametrize("module", sorted(PAGES))
def test_each_script_writes_its_own_page_by_default(module):
    page, sections = PAGES[module]
    script = importlib.import_module(module)
    assert script.DOC == common.REPO / "docs" / page
    assert script.MARKER == sections[0]  # the default section is the page's first one of this script
    text = script.DOC.read_text(encoding="utf-8")
    for marker in sections:
        start, end = common.markers(marker)
        assert text.count(start) == 1 and text.count(end) == 1, f"{page} lacks the section {marker}"
