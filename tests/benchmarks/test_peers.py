"""benchmarks.peers: failing or missing peers stay in the table with their error; the table is drawn from JSON
lines; the worker runs as a module from the repository root, under whatever interpreter the tool has."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.peers import run as peers
from benchmarks.peers import table as peers_table


def _doc(tmp_path: Path) -> Path:
    doc = tmp_path / "peers.md"
    doc.write_text("# B\n\n<!-- peers-table:start -->\nold\n<!-- peers-table:end -->\n\ntail\n")
    return doc


def _ok(tool: str, model: str, setting: str, metric: dict, **extra) -> dict:
    record = {
        "status": "ok",
        "tool": tool,
        "model": model,
        "setting": setting,
        "iters": None,
        "metric": metric,
        "calib_s": 12.5,
        "peak_rss_mb_wait4": 800.0,
        "ckpt_bytes": 20_000_000,
        "date": "2026-11-22",
        "versions": {"transformers": "5.23.0", "torch": "2.13.0"},
        "details": "",
    }
    record.update(extra)
    return record


def test_missing_interpreter_is_a_row_with_its_error(tmp_path):
    results, doc = tmp_path / "results.jsonl", _doc(tmp_path)
    missing = str(tmp_path / "nowhere" / "python")
    section = peers.main(
        [
            "--models",
            "minilm-sst2",
            "--tools",
            "optimum-quanto RTN",
            "--settings",
            "W4A16 g128",
            "--python",
            f"quanto={missing}",
            f"hf_qlimit={missing}",
            "--results",
            str(results),
            "--doc",
            str(doc),
        ]
    )
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["tool"], r["status"]) for r in records] == [
        ("FP32 (reference)", "error"),
        ("optimum-quanto RTN", "error"),
    ]
    row = next(line for line in section.splitlines() if line.startswith("| W4A16 g128 | optimum-quanto RTN"))
    assert "failed" in row and f"interpreter {missing} does not exist" in row
    text = doc.read_text()
    assert "old" not in text and text.endswith("tail\n") and "optimum-quanto RTN" in text
    # the settings not run are rows too, marked as such, never dropped
    assert "| W3A16 | optimum-quanto RTN | – |" in section and "not run yet" in section


@pytest.mark.slow
def test_worker_failure_becomes_an_error_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the worker finds `benchmarks` from the working directory run_job gives it, not ours
    tool = peers.Tool("broken peer", "no_such_peer", "rtn")
    record = peers.run_job(tool, "minilm-sst2", "W4A16", sys.executable, None, 120, tmp_path)
    assert record["status"] == "error"
    assert "ModuleNotFoundError" in record["error"] and "benchmarks.peers.tool_no_such_peer" in record["error"]
    assert record["peak_rss_mb_wait4"] > 0 and "\n" not in record["error"]


@pytest.mark.slow
def test_worker_imports_a_tool_module_and_reports_an_unsupported_setting(tmp_path, monkeypatch):
    """The whole import chain of a tool run (worker, peer_eval, tool_hf_qlimit, hf_qlimit), stopped by the tool's
    own check before any model is loaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # as in a peer's venv: nothing but what run_job passes
    tool = peers.Tool("hf_qlimit bogus", "hf_qlimit", "bogus")
    record = peers.run_job(tool, "minilm-sst2", "W4A16", sys.executable, None, 300, tmp_path)
    assert record["status"] == "unsupported", record
    assert "hf_qlimit has no algorithm 'bogus'" in record["error"] and "hf_qlimit" in record["versions"]


def test_worker_command_line(tmp_path):
    tool = peers.Tool("hf_qlimit RTN", "hf_qlimit", "rtn")
    cmd = peers.worker_command(tool, "smollm2", "W4A16 g64", "py", None, tmp_path / "ckpt", tmp_path / "r.json")
    assert cmd == [
        "py",
        "-m",
        "benchmarks.peers.worker",
        "--tool",
        "hf_qlimit",
        "--algo",
        "rtn",
        "--model",
        "smollm2",
        "--setting",
        "W4A16 g64",
        "--out_dir",
        str(tmp_path / "ckpt"),
        "--result",
        str(tmp_path / "r.json"),
    ]
    assert peers.worker_command(tool, "smollm2", "W4A16 g64", "py", 5, tmp_path, tmp_path)[-2:] == ["--iters", "5"]


def test_install_failure_is_read_from_the_log(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gptqmodel.log").write_text(
        "Collecting gptqmodel\nERROR: No matching distribution found\nrc=1\n"
    )
    (tmp_path / "logs" / "quanto.log").write_text("Successfully installed optimum-quanto\nrc=0\n")
    assert peers.install_error("gptqmodel", tmp_path) == "install failed: ERROR: No matching distribution found"
    assert peers.install_error("quanto", tmp_path) is None and peers.install_error("other", tmp_path) is None


def test_table_from_json_lines(tmp_path):
    lm, bert = "smollm2", "minilm-sst2"
    lines = [
        _ok("FP32 (reference)", lm, "FP32", {"ppl": 20.0}),
        _ok("hf_qlimit RTN", lm, "W4A16 g64", {"ppl": 30.0}),
        _ok("hf_qlimit RTN", lm, "W4A16 g64", {"ppl": 25.0}),  # newer record of the same run wins
        _ok("llm-compressor GPTQ", lm, "W4A16 g64", {"ppl": 22.0}, save_error="OSError: disk full"),
        {
            "status": "unsupported",
            "error": "quanto has no 3-bit weights",
            "tool": "optimum-quanto RTN",
            "model": lm,
            "setting": "W3A16 g64",
            "iters": None,
            "date": "2026-11-22",
        },
        {
            "status": "error",
            "error": "ValueError: boom",
            "tool": "GPTQModel GPTQ",
            "model": bert,
            "setting": "W4A16",
            "iters": None,
            "date": "2026-11-22",
            "peak_rss_mb_wait4": 300.0,
        },
        _ok("hf_qlimit QDrop", bert, "W4A16", {"accuracy": 88.0}, iters=200),
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = peers_table.load_records(path)
    assert records["hf_qlimit RTN", lm, "W4A16 g64"]["metric"]["ppl"] == 25.0
    section = peers_table.render(records, [bert, lm], peers_table.TOOLS)
    assert "| W4A16 g64 | hf_qlimit RTN | 25.00 | 12.5 | 800 | 20.0 |" in section
    assert "not saved: OSError: disk full" in section
    assert "| W3A16 g64 | optimum-quanto RTN | unsupported |" in section and "quanto has no 3-bit weights" in section
    assert "| W4A16 | GPTQModel GPTQ | failed | – | 300 | – | failed: ValueError: boom |" in section
    assert (
        "W4A16 g64: hf_qlimit loses.** best peer llm-compressor GPTQ 22.00, best hf_qlimit (hf_qlimit RTN) 25.00."
        in section
    )
    assert "W4A16: hf_qlimit ahead" not in section  # no peer measured there: no verdict
    assert "minilm-sst2 200" in section and "| FP32 | FP32 (reference) | 20.00 |" in section
    assert section.endswith("Generated by `python -m benchmarks.peers.run` (`--table_only` redraws it).")


def test_default_rows_at_a_stale_batch_give_way_to_current_ones(tmp_path):
    """An "hf_qlimit default" record at another batch than today's default is history: shown only where nothing
    newer exists, and never over a record at the current batch, whatever the order."""
    w2, w3 = (peers_table.peer_eval.default_batch("smollm2", bits) for bits in (2, 3))
    assert w2 != w3  # the default's batch depends on the width (else this test has nothing to tell apart)
    rows = [
        _ok("hf_qlimit default", "smollm2", "W2A16 g64", {"ppl": 86.0}, details=f"x, batch {w2}, y"),
        _ok("hf_qlimit default", "smollm2", "W2A16 g64", {"ppl": 99.0}, details=f"x, batch {w3}, y"),
        _ok("hf_qlimit default", "smollm2", "W3A16 g64", {"ppl": 40.0}, details=f"x, batch {w2}, y"),
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    records = peers_table.load_records(path)
    assert records["hf_qlimit default", "smollm2", "W2A16 g64"]["metric"]["ppl"] == 86.0
    assert records["hf_qlimit default", "smollm2", "W3A16 g64"]["metric"]["ppl"] == 40.0  # nothing newer
