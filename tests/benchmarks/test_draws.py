"""benchmarks.glue.draws: each draw's cell, mean ± sample sd, the task's headline metric (F1 for MRPC)."""

from __future__ import annotations

import pytest

from benchmarks.glue import draws


def _run(metrics: dict, fp: dict, seconds: float = 100.0) -> dict:
    return {"fp": {"validation": fp}, "quantized": {"validation": metrics}, "timings_s": {"quantize_s": seconds}}


def test_mean_sd_and_the_headline_metric():
    mrpc = {"accuracy": 0.70, "f1": 0.80}
    results = {
        ("Default", "mrpc", "W4A4", 42): _run({"accuracy": 0.75, "f1": 0.84}, mrpc, 90.0),
        ("Default", "mrpc", "W4A4", 1): _run({"accuracy": 0.74, "f1": 0.82}, mrpc, 110.0),
        ("Default", "mrpc", "W4A4", 2): None,  # a failed run
        ("more", "mrpc", "W4A4", 42): {},  # not measured: the row has no run, so no line
    }
    rows = {"Default": [], "more": ["--num_samples=512"]}
    lines = draws.build_table(results, rows, ["mrpc"], ["W4A4"], [42, 1, 2]).splitlines()
    assert lines[0] == "| task (metric) | setting | row | FP | seed 42 | seed 1 | seed 2 | mean ± sd | time |"
    assert lines[2:] == ["| MRPC (F1) | W4A4 | Default | 80.00 | 84.00 | 82.00 | failed | 83.00 ± 1.41 (n=2) | 100 s |"]
    assert draws.mean_sd([81.0]) == "81.00 (n=1)" and draws.mean_sd([]) == "–"


def test_a_row_keeps_the_flags_it_was_measured_with(tmp_path):
    assert draws.load_rows(tmp_path, "more", ["--iters=400"]) == {"Default": [], "more": ["--iters=400"]}
    # --table_only names the row without flags: its saved ones are shown
    assert draws.load_rows(tmp_path, "more", [])["more"] == ["--iters=400"]
    with pytest.raises(SystemExit, match="measured with --iters=400, not --iters=800"):
        draws.load_rows(tmp_path, "more", ["--iters=800"])  # other flags would mislabel the runs on disk
    assert draws.load_rows(tmp_path, "more", [])["more"] == ["--iters=400"]
