"""benchmarks/mixed_precision.py: accumulated rows (a rerun replaces a cell), the table's order and cells."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import mixed_precision

COMMON = {"dev_size": 872, "num_samples": 256, "candidates": [2, 4, 8], "pairs": True, "machine": "m", "date": "d"}


def test_rows_accumulate_and_a_rerun_replaces_its_cell(tmp_path):
    path = tmp_path / "results.jsonl"
    args = mixed_precision.parse_args(["--results", str(path), "--readme", str(tmp_path / "README.md")])
    bits = {"a": 2, "b": 4}
    mixed_precision.append_result(path, {"method": "qdrop", "setting": "mixed 3.0", "bits": bits, "avg_bits": 3.0,
                                         "mib": 1.0, "seconds": 5, "accuracy": 0.80, **COMMON})  # fmt: skip
    mixed_precision.append_result(path, {"method": "FP32", "setting": "-", "bits": None, "accuracy": 0.889, **COMMON})
    mixed_precision.append_result(path, {"method": "rtn", "setting": "uniform W3", "bits": {"a": 3, "b": 3},
                                         "avg_bits": 3.0, "mib": 1.0, "seconds": 1, "accuracy": 0.85, **COMMON})  # fmt: skip
    mixed_precision.append_result(path, {"method": "qdrop", "setting": "mixed 3.0", "bits": bits, "avg_bits": 3.0,
                                         "mib": 1.0, "seconds": 6, "accuracy": 0.87, **COMMON})  # fmt: skip
    rows = mixed_precision.read_results(path)
    assert len(rows) == 3
    lines = mixed_precision.build_table(rows, args).splitlines()
    body = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert body == [
        "| FP32 | - | 32 | 88.90 | - | - |",
        "| rtn | uniform W3 | 3.00 | 85.00 | 1.00 | 1 |",
        "| qdrop | mixed 3.0 (1×W2, 1×W4) | 3.00 | 87.00 | 1.00 | 6 |",
    ]
    mixed_precision.write_table(Path(args.readme), "\n".join(lines))
    mixed_precision.write_table(Path(args.readme), "second")
    text = Path(args.readme).read_text()
    assert text.count("mixed-table:start") == 1 and "second" in text and "88.90" not in text
