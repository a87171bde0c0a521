"""Mixed vs uniform weight precision at the same budget: MiniLM-L6 fine-tuned on SST-2, A8, dev accuracy.

Budgets (average weight bits over the block Linears): 3.0 mixed from {2, 4, 8} against uniform W3, and 2.5 mixed
against uniform W2 (below the budget) and W3 (above it). Each with round-to-nearest and QDrop (fast preset).

    python -m benchmarks.glue.mixed_precision          # full run; the table into docs/results/mixed-precision.md
    python -m benchmarks.glue.mixed_precision --quick  # a few samples and iterations: checks that it runs

Each row is appended to `--results` (JSON lines) as soon as it is measured, so that runs can be split over
processes (`--methods qdrop --settings "uniform W2" "mixed 2.5"`) and the table rebuilt with `--table_only`;
a later row for the same method and setting replaces an earlier one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_qlimit  # noqa: F401  (registers the qlimit quantizer)
from benchmarks import common
from benchmarks.common import ResultsLog
from hf_qlimit import QLimitConfig, quantize
from hf_qlimit import mixed_precision as mp
from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration
from hf_qlimit.models import get_adapter

DOC = common.RESULTS_DOCS / "mixed-precision.md"
MARKER = "mixed-table"
# (label, avg-bits budget of a mixed allocation, or the bits of a uniform one)
SETTINGS = [("uniform W2", None, 2), ("mixed 2.5", 2.5, None), ("uniform W3", None, 3), ("mixed 3.0", 3.0, None)]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer(
            [r["sentence"] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        pred = model(**enc).logits.argmax(-1)
        correct += int((pred == torch.tensor([int(r["label"]) for r in chunk])).sum())
    return correct / len(rows)


def base_config(method: str, args: argparse.Namespace, **kwargs) -> QLimitConfig:
    quick = {"num_samples": 32, "batch_size": 16, "iters": 20} if args.quick else {}
    config = QLimitConfig(act_bits=8, method=method, preset="fast", seed=0, max_length=128, **quick, **kwargs)
    return config.resolved(causal_lm=False)  # presets fill their fields once resolved; read here before quantizing


def allocate(model_path: str, calib: list[dict], budget: float, args: argparse.Namespace) -> dict[str, int]:
    """The mixed-precision allocation for one budget (sensitivities measured once, then read from the cache)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    config = base_config("rtn", args, bit_candidates=args.candidates, avg_bits=budget, sensitivity_cache=args.cache)
    data = prepare_calibration(calib, config.num_samples, config.max_length, model.config.pad_token_id, config.seed)
    batches = length_sorted_batches(data, config.batch_size)  # as the pipeline builds them
    return mp.allocate_bits(model, get_adapter(model), batches, config, torch.device("cpu"), pairwise=not args.no_pairs)


def histogram(bits: dict[str, int]) -> str:
    return ", ".join(f"{n}×W{b}" for b, n in sorted(Counter(bits.values()).items()))


def size_and_bits(model, config: QLimitConfig, bits: dict[str, int]) -> tuple[float, float]:
    specs = {n: {"w": b, "a": 8} for n, b in bits.items()}
    usage = mp.budget_usage(mp.layer_costs(model, specs, config), bits)
    return usage["avg_bits"], usage["bytes"] / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(common.SHARED / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data", default=str(common.SHARED / "data" / "glue" / "SST-2"))
    parser.add_argument("--methods", nargs="+", default=["rtn", "qdrop"])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=[label for label, _, _ in SETTINGS],
        choices=[label for label, _, _ in SETTINGS],
    )
    parser.add_argument("--candidates", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hf_qlimit_mixed_sensitivity.json"))
    parser.add_argument("--results", default=None, help="JSON lines of measured rows (default benchmarks/out/mixed/)")
    common.add_doc_arguments(parser, None, default_text=f"{DOC.relative_to(common.REPO)}; none with --quick")
    parser.add_argument("--table_only", action="store_true", help="rebuild the table from --results, run nothing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-pairs", action="store_true", help="allocate without the within-block pair terms")
    parser.add_argument("--quick", action="store_true", help="32 calibration samples, 20 iterations, 128 dev sentences")
    args = parser.parse_args(argv)
    out = common.OUT / ("mixed_quick" if args.quick else "mixed")
    args.results = Path(args.results or out / "results.jsonl")
    args.doc = args.doc or (None if args.quick else DOC)
    return args


def read_rows(log: ResultsLog) -> list[dict]:
    """The measured rows in the order first measured; a later row for the same (method, setting) replaces an
    earlier one."""
    return list(log.records(lambda row: (row["method"], row["setting"])).values())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = ResultsLog("glue.mixed_precision", results=args.results)
    if not args.table_only:
        measure(args, log)
    common.publish(build_table(read_rows(log), args), MARKER, common.doc_target(args), "glue.mixed_precision")


def measure(args: argparse.Namespace, log: ResultsLog) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = read_tsv(Path(args.data) / "train.tsv")
    random.Random(0).shuffle(train)
    dev = read_tsv(Path(args.data) / "dev.tsv")[: 128 if args.quick else None]
    num_samples = base_config("rtn", args).num_samples
    calib = [dict(tokenizer(r["sentence"], truncation=True, max_length=128)) for r in train[:num_samples]]
    shared = {
        "dev_size": len(dev),
        "num_samples": num_samples,
        "candidates": args.candidates,
        "pairs": not args.no_pairs,
        "machine": common.machine(),
        "date": str(datetime.date.today()),
    }

    if not any(r["method"] == "FP32" for r in read_rows(log)):
        fp_model = AutoModelForSequenceClassification.from_pretrained(args.model)
        log.append(
            {"method": "FP32", "setting": "-", "bits": None, "accuracy": accuracy(fp_model, tokenizer, dev), **shared}
        )
    wanted = [s for s in SETTINGS if s[0] in args.settings]
    allocations = {}
    for budget in sorted({b for _, b, _ in wanted if b is not None}):
        tick = time.perf_counter()
        allocations[budget] = allocate(args.model, calib, budget, args)
        print(f"avg {budget}: {histogram(allocations[budget])}  ({time.perf_counter() - tick:.0f}s)", flush=True)
    fp_model = AutoModelForSequenceClassification.from_pretrained(args.model)
    names = list(mp.block_linears(fp_model, get_adapter(fp_model), base_config("rtn", args)))

    for method in args.methods:
        for label, budget, uniform in wanted:
            bits = allocations[budget] if uniform is None else {n: uniform for n in names}
            model = AutoModelForSequenceClassification.from_pretrained(args.model)
            config = base_config(method, args, weight_bits=uniform or 4, module_bits=bits)
            avg, megabytes = size_and_bits(model, config, bits)
            tick = time.perf_counter()
            quantize(model, calib, config)
            seconds = time.perf_counter() - tick
            row = {
                "method": method,
                "setting": label,
                "bits": bits,
                "avg_bits": avg,
                "mib": megabytes,
                "seconds": seconds,
                "accuracy": accuracy(model, tokenizer, dev),
                **shared,
            }
            log.append(row)
            print(f"{method} {label}: acc {row['accuracy']:.4f}, {row['seconds']:.0f} s", flush=True)


def build_table(results: list[dict], args: argparse.Namespace) -> str:
    """Rows ordered FP first, then by method and by the SETTINGS order; missing cells are simply absent."""
    order = {label: i for i, (label, _, _) in enumerate(SETTINGS)}
    methods = ["FP32", *args.methods]
    rows = sorted(
        (r for r in results if r["method"] in methods),
        key=lambda r: (methods.index(r["method"]), order.get(r["setting"], -1)),
    )
    header = ["method", "block Linear weights (A8)", "avg bits", "dev acc", "block Linears MiB", "quantize s"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for r in rows:
        if r["method"] == "FP32":
            cells = ["FP32", "-", "32", f"{100 * r['accuracy']:.2f}", "-", "-"]
        else:
            mixed = r["setting"].startswith("mixed")
            weights = f"{r['setting']} ({histogram(r['bits'])})" if mixed else r["setting"]
            cells = [
                r["method"],
                weights,
                f"{r['avg_bits']:.2f}",
                f"{100 * r['accuracy']:.2f}",
                f"{r['mib']:.2f}",
                f"{r['seconds']:.0f}",
            ]
        lines.append(f"| {' | '.join(cells)} |")
    if not rows:
        return "No results yet: run `python -m benchmarks.glue.mixed_precision`."
    first = rows[0]
    machines = sorted({r["machine"] for r in rows})
    dates = sorted({r["date"] for r in rows})
    pairs = "with" if first["pairs"] else "without"
    note = (
        f"SST-2 dev accuracy ({first['dev_size']} sentences), A8; {first['num_samples']} calibration sentences from "
        f"train; fast preset (QDrop {base_config('qdrop', args).iters} iterations per block); mixed = the ILP's "
        f"choice from {first['candidates']} at that average, {pairs} pair terms; block Linears MiB = packed codes + "
        f"scales + zero points. Machine: {'; '.join(machines)}. Date: {', '.join(dates)}. "
        "Generated by `python -m benchmarks.glue.mixed_precision` (rows accumulate in its `--results` file)."
    )
    return "\n".join([note, "", *lines])


if __name__ == "__main__":
    main()
