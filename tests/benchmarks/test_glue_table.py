"""benchmarks/glue_table.py: the table it builds from results.json contents and the README rewrite."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def glue_table():
    spec = importlib.util.spec_from_file_location("glue_table", REPO / "benchmarks" / "glue_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["glue_table"] = module
    spec.loader.exec_module(module)
    return module


GPU = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3"}


def _result(fp: dict, quantized: dict, seconds: float, n_eval: int) -> dict:
    return {
        "fp": {"validation": fp},
        "quantized": {"validation": quantized},
        "timings_s": {"quantize_s": seconds},
        "eval_samples": {"validation": n_eval},
        "calibration": {"num_samples": 256},
        "qlimit_config": {"preset": "fast", "iters": 500, "batch_size": 32},
    }


def test_table_and_readme_rewrite(glue_table, tmp_path):
    results = {
        ("sst2", "RTN", "W8A8"): _result({"accuracy": 0.8888}, {"accuracy": 0.8853}, 12.3, 872),
        ("sst2", "RTN", "W4A8"): None,  # a failed run
        ("mrpc", "RTN", "W8A8"): _result({"accuracy": 0.7843, "f1": 0.8538}, {"accuracy": 0.7794, "f1": 0.851}, 7, 408),
        ("mrpc", "RTN", "W4A8"): _result({"accuracy": 0.7843, "f1": 0.8538}, {"accuracy": 0.70, "f1": 0.80}, 6.6, 408),
    }
    tables = glue_table.build_tables(results, ["sst2", "mrpc"], ["RTN"], ["W8A8", "W4A8"])
    lines = tables.splitlines()
    assert lines[0] == "| Task (metric) | FP | RTN W8A8 | RTN W4A8 |"
    assert lines[2] == "| SST-2 (acc) | 88.9 | 88.5 | failed |"
    assert lines[3] == "| MRPC (acc/F1) | 78.4/85.4 | 77.9/85.1 | 70.0/80.0 |"
    assert "| SST-2 | 12 s | – |" in lines and "| MRPC | 7 s | 7 s |" in lines

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{glue_table.START}\nold table\n{glue_table.END}\n\nAfter.\n")
    section = glue_table.render_section(tables, results, "2026-01-02", "Linux, Some CPU")
    glue_table.rewrite_readme(readme, section)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title\n") and text.endswith("\n\nAfter.\n")
    assert text.count(glue_table.START) == 1 and text.count(glue_table.END) == 1
    assert "Measured 2026-01-02 on Linux, Some CPU." in text and "Dev sentences: SST-2 872, MRPC 408." in text
    glue_table.rewrite_readme(readme, section)  # rerunning replaces, never appends
    assert readme.read_text() == text

    readme.write_text("# No markers\n")
    with pytest.raises(ValueError, match="markers"):
        glue_table.rewrite_readme(readme, section)


def test_method_rows_layout(glue_table):
    results = {
        ("sst2", "RTN", "W2A8"): _result({"accuracy": 0.8888}, {"accuracy": 0.8165}, 12.4, 872),
        ("sst2", "QDrop", "W2A8"): _result({"accuracy": 0.8888}, {"accuracy": 0.8658}, 882.1, 872),
        ("sst2", "QDrop", "W4A4"): {**_result({"accuracy": 0.8888}, {"accuracy": 0.79}, 75, 872), "environment": GPU},
        ("sst2", "BRECQ", "W4A4"): {},
        ("stsb", "RTN", "W2A8"): {},
    }
    tables = glue_table.build_method_tables(results, ["sst2", "stsb"], ["RTN", "BRECQ", "QDrop"], ["W2A8", "W4A4"])
    lines = tables.splitlines()
    assert lines[0] == "| Task (metric) | FP | Method | W2A8 | W4A4 |"
    assert lines[2] == "| SST-2 (acc) | 88.9 | RTN | 81.7 (12 s) | failed |"
    assert lines[3] == "| SST-2 (acc) | 88.9 | BRECQ | failed | – |"
    assert lines[4] == "| SST-2 (acc) | 88.9 | QDrop | 86.6 (882 s) | 79.0 (75 s †) |"  # † a GPU run
    assert len(lines) == 5  # STS-B has no measured run
    section = glue_table.render_section(tables, results, "2026-01-02", "Linux, Some CPU")
    assert "Times marked † were measured on a GPU (NVIDIA H100 80GB HBM3)" in section


def test_measured_spans_the_runs_days_and_their_threads(glue_table, tmp_path):
    common = glue_table._common
    old = tmp_path / "results.json"  # an older run, without a recorded date: the file's time stands in
    old.write_text('{"environment": {"device": "cpu"}}')
    os.utime(old, (1_700_000_000, 1_700_000_000))  # 2023-11-14 UTC
    runs = {
        ("sst2", "RTN", "W8A8"): common.read_results(old),
        ("sst2", "QDrop", "W8A8"): {"environment": {"date": "2026-11-23T01:00:00+00:00", "torch_threads": 1}},
        ("sst2", "BRECQ", "W8A8"): {"environment": {**GPU, "date": "2026-11-22T10:00:00+00:00"}},
        ("sst2", "AdaRound", "W8A8"): None,  # failed
    }
    assert common.measured(runs.values()) == ("2023-11-14 to 2026-11-23", 1)
    runs["sst2", "RTN", "W4A8"] = {"environment": {"date": "2026-11-23T02:00:00+00:00", "torch_threads": 2}}
    assert common.measured(runs.values())[1] == "1 to 2"  # mixed: the table does not claim one thread count
    assert "(1 to 2 threads)" in common.machine("1 to 2")


def test_qdrop_states_its_dropping_and_default_states_nothing(glue_table, tmp_path, monkeypatch):
    """QDrop's column must drop (the `fast` default turns dropping off); "Default" runs the defaults."""
    seen = []
    failed = type("Failed", (), {"returncode": 1})
    monkeypatch.setattr(glue_table.subprocess, "run", lambda cmd, check: seen.append(cmd) or failed)
    for method in ("QDrop", "Default", "BRECQ"):
        assert glue_table.run_one("stsb", method, "W4A4", tmp_path, tmp_path / "out", [], reuse=False) is None
    qdrop, default, brecq = seen
    assert qdrop[qdrop.index("--method") + 1] == "qdrop" and qdrop[qdrop.index("--drop_prob") + 1] == "0.5"
    assert "--method" not in default and "--drop_prob" not in default
    assert "default-w4a4" in default[default.index("--output_dir") + 1]
    assert brecq[brecq.index("--method") + 1] == "brecq" and "--drop_prob" not in brecq
