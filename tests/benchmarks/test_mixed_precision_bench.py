"""benchmarks.glue.mixed_precision: accumulated rows (a rerun replaces a cell), the table's order and cells."""

from __future__ import annotations

from benchmarks import common
from benchmarks.common import ResultsLog
from benchmarks.glue import mixed_precision

COMMON = {"dev_size": 872, "num_samples": 256, "candidates": [2, 4, 8], "pairs": True, "machine": "m", "date": "d"}


def test_rows_accumulate_and_a_rerun_replaces_its_cell(tmp_path):
    path, doc = tmp_path / "results.jsonl", tmp_path / "mixed-precision.md"
    args = mixed_precision.parse_args(["--results", str(path), "--doc", str(doc)])
    log = ResultsLog("test", results=path)
    bits = {"a": 2, "b": 4}
    log.append(
        {
            "method": "qdrop",
            "setting": "mixed 3.0",
            "bits": bits,
            "avg_bits": 3.0,
            "mib": 1.0,
            "seconds": 5,
            "accuracy": 0.80,
            **COMMON,
        }
    )
    log.append({"method": "FP32", "setting": "-", "bits": None, "accuracy": 0.889, **COMMON})
    log.append(
        {
            "method": "rtn",
            "setting": "uniform W3",
            "bits": {"a": 3, "b": 3},
            "avg_bits": 3.0,
            "mib": 1.0,
            "seconds": 1,
            "accuracy": 0.85,
            **COMMON,
        }
    )
    log.append(
        {
            "method": "qdrop",
            "setting": "mixed 3.0",
            "bits": bits,
            "avg_bits": 3.0,
            "mib": 1.0,
            "seconds": 6,
            "accuracy": 0.87,
            **COMMON,
        }
    )
    rows = mixed_precision.read_rows(log)
    assert len(rows) == 3
    lines = mixed_precision.build_table(rows, args).splitlines()
    body = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert body == [
        "| FP32 | - | 32 | 88.90 | - | - |",
        "| rtn | uniform W3 | 3.00 | 85.00 | 1.00 | 1 |",
        "| qdrop | mixed 3.0 (1×W2, 1×W4) | 3.00 | 87.00 | 1.00 | 6 |",
    ]
    doc.write_text(
        "# Mixed\n\n<!-- mixed-table:start -->\n<!-- mixed-table:end -->\n\n<!-- mixed-lm-table:start -->\nlm\n"
        "<!-- mixed-lm-table:end -->\n"
    )
    common.publish("\n".join(lines), mixed_precision.MARKER, args.doc, "test")
    common.publish("second", mixed_precision.MARKER, args.doc, "test")
    text = doc.read_text()
    assert text.count("mixed-table:start") == 1 and "second" in text and "88.90" not in text and "\nlm\n" in text


def test_quick_prints_only_unless_a_page_is_named(tmp_path):
    assert mixed_precision.parse_args([]).doc == mixed_precision.DOC
    assert mixed_precision.parse_args(["--quick"]).doc is None
    assert mixed_precision.parse_args(["--quick", "--readme", str(tmp_path / "x.md")]).doc == tmp_path / "x.md"
