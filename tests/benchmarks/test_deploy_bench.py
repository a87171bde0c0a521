"""benchmarks/deploy.py: the table and the target verdicts come from the measured rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import deploy  # noqa: E402


def _row(mb: float, rss: float, tok: float, diff: float = 0.0, ref: str = deploy.REFERENCE, ppl: float = 30.0) -> dict:
    return {"load_s": 1.0, "mb_after_load": mb, "mb_after_generate": mb, "rss_mb": rss, "rss_imports_mb": 200.0,
            "peak_rss_mb": rss, "tok_s_1t": tok, "tok_s_2t": tok, "tok_s_cpu_1t": tok, "logits_rel_diff": diff,
            "logits_ref": ref, "ppl": ppl, "load_avg": [1.0, 2.0]}  # fmt: skip


def _results(packed_mb: float, packed_tok: float) -> dict:
    rows = {
        "FP32": _row(500, 900, 6.0, ref="FP32"),
        "bf16": _row(250, 650, 8.0, 0.03, ref="FP32"),
        "W4 packed (hf_qlimit default)": _row(packed_mb, 800, packed_tok, 0.02),
        deploy.REFERENCE: _row(700, 1100, 5.0),
        "W4 compressed-tensors, no hf_qlimit": _row(600, 1000, 6.0, 2e-3),
    }
    return {"models": {"smollm2": {"rows": rows, "ppl_windows": 16, "date": "2026-01-01", "commit": "abc1234"}},
            "threads": [1, 2], "date": "2026-01-02", "commit": "def5678", "machine": "test machine"}  # fmt: skip


def test_table_rows_and_verdicts():
    text = deploy.table(_results(packed_mb=120, packed_tok=9.0))
    assert "| W4 packed (hf_qlimit default) | 1.0 | 120 | 120 | 800 (200) | 800 | 9.0 | 9.0 | 9.0 | 2.0e-02 (W4 cached) | 30.00 |" in text
    assert "after generate 0.24x FP32 (target <= 0.25): met" in text
    assert "process RSS 0.89x FP32 (target <= 0.5): NOT met" in text
    assert "RSS above the imports 600 MB against 700 MB (0.86x)" in text
    assert "1.50x by CPU time (target >= 1.0): met / met" in text
    assert "within 2.0e-03 relative of hf_qlimit's (target 1e-3): NOT met" in text
    assert "Measured 2026-01-01 at hf_qlimit commit abc1234" in text and "test machine" in text


def test_targets_fail_when_the_packed_model_is_big_or_slow():
    text = deploy.table(_results(packed_mb=300, packed_tok=3.0))
    assert "0.60x FP32 (target <= 0.25): NOT met" in text
    assert "(target >= 1.0): NOT met / NOT met" in text
