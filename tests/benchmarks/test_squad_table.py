"""benchmarks.squad.table without running any model: settings, table and doc page rewriting."""

from __future__ import annotations

import pytest

from benchmarks.squad import table as squad_table

HEADER = {
    "date": "2026-01-01",
    "machine": "Test CPU",
    "threads": "1",
    "torch": "2.x",
    "preset": "fast",
    "data": "SQuAD v1.1 dev, odd articles",
    "reference": "Reference FP: EM 51.01, F1 65.12.",
}


def _results(label: str | None, em: float, f1: float, reloaded_f1: float | None = None) -> dict:
    stages = {}
    if label is None:
        stages["fp"] = {"exact_match": em, "f1": f1}
        return {"results": stages}
    stages["quantized"] = {"exact_match": em, "f1": f1}
    if reloaded_f1 is not None:
        stages["reloaded"] = {"exact_match": em, "f1": reloaded_f1}
    return {"results": stages, "quantization": {"label": label, "quantize_seconds": 120.0}}


def test_setting_flags():
    assert squad_table.setting_args("fp") == ["--no_quantize"]
    flags = squad_table.setting_args("qdrop-w2a8")
    assert flags == ["--method", "qdrop", "--drop_prob", "0.5", "--weight_bits", "2", "--act_bits", "8", "--no_eval_fp"]
    # the defaults: no method flag, so the row is whatever QLimitConfig resolves to
    assert squad_table.setting_args("default-w4a4") == ["--weight_bits", "4", "--act_bits", "4", "--no_eval_fp"]
    assert "--no_eval_fp" not in squad_table.setting_args("rtn-w4anone", eval_fp=True)
    with pytest.raises(ValueError):
        squad_table.setting_args("gptq-w4a8")


def test_table_rows_sorted_and_reloaded_scores_reported():
    rows = squad_table.rows_from(_results("qdrop W2A8", 10.0, 20.0, reloaded_f1=21.0))
    rows += squad_table.rows_from(_results("rtn W8A8", 50.0, 64.0))
    rows += squad_table.rows_from(_results(None, 51.0, 65.0))
    rows.sort(key=squad_table._row_order)
    assert [(r["label"], r["bits"]) for r in rows] == [("FP", "FP32"), ("RTN", "8/8"), ("QDrop", "2/8")]
    assert rows[2]["f1"] == 21.0  # the model reloaded from disk is what counts
    table = squad_table.format_table(rows, HEADER)
    assert "| QDrop | 2/8 | 10.00 | 21.00 | -44.00 | 2.0 min |" in table
    assert "| FP | FP32 | 51.00 | 65.00 |  |  |" in table
    assert "Test CPU" in table and "2026-01-01" in table


def test_doc_table_replaced_between_markers_only():
    text = f"intro\n{squad_table.START}\nold table\n{squad_table.END}\noutro\n"
    new = squad_table.replace_table(text, "| new |")
    assert new == f"intro\n{squad_table.START}\n| new |\n{squad_table.END}\noutro\n"
    assert squad_table.replace_table(new, "| new |") == new  # idempotent
    with pytest.raises(ValueError):
        squad_table.replace_table("no markers", "| new |")


def test_quick_writes_a_copy_of_the_page_not_the_page(tmp_path):
    args = squad_table.parse_args(["--quick", "--output_dir", str(tmp_path / "squad")])
    assert args.doc == tmp_path / "squad_quick" / "README.quick.md" and args.settings == ["qdrop-w4a8"]
    assert (
        squad_table.parse_args([]).doc == squad_table.DOC
        and squad_table.parse_args([]).settings == squad_table.ALL_SETTINGS
    )


def test_machine_comes_from_the_runs_environment():
    gpu = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "processor": "x86_64",
        "torch_threads": 2,
        "versions": {"torch": "2.11.0+cu130"},
    }
    cpu = {"gpu": None, "processor": "x86_64", "torch_threads": 1, "versions": {"torch": "2.13.0+cpu"}}
    assert squad_table._machine([gpu, gpu]) == {
        "machine": "NVIDIA H100 80GB HBM3",
        "threads": "2",
        "torch": "2.11.0+cu130",
    }
    mixed = squad_table._machine([gpu, cpu])
    assert mixed["machine"] == "NVIDIA H100 80GB HBM3, x86_64" and mixed["torch"] == "2.11.0+cu130, 2.13.0+cpu"
    # results.json of older runs recorded no environment (read_results adds only the date): this machine stands in
    assert squad_table._machine([{"date": "2026-01-01"}])["machine"] == squad_table.common.cpu_name()


def test_the_table_is_dated_by_its_runs_not_by_the_day_it_is_drawn():
    late = {"date": "2026-12-08T00:40:00+00:00"}
    assert squad_table.measured_days([{"date": "2026-12-07T22:30:15+00:00"}, None, late]) == "2026-12-07 to 2026-12-08"
    assert squad_table.measured_days([late, late]) == "2026-12-08"
