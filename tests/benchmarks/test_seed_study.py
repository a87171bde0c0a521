"""benchmarks.glue.seed_study: per-seed cells, mean ± sample sd, missing runs."""

from __future__ import annotations

from benchmarks.glue import seed_study


def _run(acc: float, gpu: str | None = None) -> dict:
    return {
        "fp": {"validation": {"accuracy": 0.9}},
        "quantized": {"validation": {"accuracy": acc}},
        "environment": {"gpu": gpu},
    }


def test_mean_and_sd_over_seeds():
    results = {
        ("QDrop", 500, 1): _run(0.78),
        ("QDrop", 500, 2): _run(0.80, gpu="H100"),
        ("QDrop", 500, 3): _run(0.82),
        ("QDrop", 2000, 1): _run(0.81),
        ("QDrop", 2000, 2): {},
    }
    lines = seed_study.build_table(results, ["QDrop"], [500, 2000], [1, 2, 3]).splitlines()
    assert lines[0] == "| Method | Iterations | seed 1 | seed 2 | seed 3 | mean ± sd |"
    assert lines[2] == "| QDrop | 500 | 78.0 | 80.0 † | 82.0 | 80.00 ± 2.00 (n=3) |"
    assert lines[3] == "| QDrop | 2000 | 81.0 | – | – | 81.00 (n=1) |"
