"""Mixed vs uniform weight precision at the same budget: MiniLM-L6 fine-tuned on SST-2, A8, dev accuracy.

Budgets (average weight bits over the block Linears): 3.0 mixed from {2, 4, 8} against uniform W3, and 2.5 mixed
against uniform W2 (below the budget) and W3 (above it). Each with round-to-nearest and QDrop (fast preset).

    python benchmarks/mixed_precision.py            # full run; writes the table into benchmarks/README.md
    python benchmarks/mixed_precision.py --quick    # a few samples and iterations: checks that it runs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_qlimit  # noqa: F401  (registers the qlimit quantizer)
from hf_qlimit import QLimitConfig, quantize
from hf_qlimit import mixed_precision as mp
from hf_qlimit.calibration import length_sorted_batches, prepare_calibration
from hf_qlimit.models import get_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this script
import _common

ROOT = Path(__file__).resolve().parents[1]
MARKER = "mixed-table"
START, END = _common.markers(MARKER)
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
    return QLimitConfig(act_bits=8, method=method, preset="fast", seed=0, max_length=128, **quick, **kwargs)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2"))
    parser.add_argument("--methods", nargs="+", default=["rtn", "qdrop"])
    parser.add_argument("--candidates", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hf_qlimit_mixed_sensitivity.json"))
    parser.add_argument("--readme", default=None, help="default benchmarks/README.md; with --quick, none")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-pairs", action="store_true", help="allocate without the within-block pair terms")
    parser.add_argument("--quick", action="store_true", help="32 calibration samples, 20 iterations, 128 dev sentences")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    readme = args.readme or (None if args.quick else str(ROOT / "benchmarks" / "README.md"))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = read_tsv(Path(args.data) / "train.tsv")
    random.Random(0).shuffle(train)
    dev = read_tsv(Path(args.data) / "dev.tsv")[: 128 if args.quick else None]
    num_samples = base_config("rtn", args).num_samples
    calib = [dict(tokenizer(r["sentence"], truncation=True, max_length=128)) for r in train[:num_samples]]

    fp_model = AutoModelForSequenceClassification.from_pretrained(args.model)
    rows = [("FP32", "-", "32", f"{accuracy(fp_model, tokenizer, dev):.4f}", "-", "-")]
    allocations = {}
    for budget in sorted(b for _, b, _ in SETTINGS if b is not None):
        tick = time.perf_counter()
        allocations[budget] = allocate(args.model, calib, budget, args)
        print(f"avg {budget}: {histogram(allocations[budget])}  ({time.perf_counter() - tick:.0f}s)", flush=True)
    names = list(next(iter(allocations.values())))

    for method in args.methods:
        for label, budget, uniform in SETTINGS:
            bits = allocations[budget] if uniform is None else {n: uniform for n in names}
            model = AutoModelForSequenceClassification.from_pretrained(args.model)
            config = base_config(method, args, weight_bits=uniform or 4, module_bits=bits)
            avg, megabytes = size_and_bits(model, config, bits)
            tick = time.perf_counter()
            quantize(model, calib, config)
            seconds = time.perf_counter() - tick
            acc = accuracy(model, tokenizer, dev)
            weights = label if uniform else f"{label} ({histogram(bits)})"
            rows.append((method, weights, f"{avg:.2f}", f"{acc:.4f}", f"{megabytes:.2f}", f"{seconds:.0f}"))
            print(" | ".join(rows[-1]), flush=True)

    header = ["method", "block Linear weights (A8)", "avg bits", "dev acc", "block Linears MiB", "quantize s"]
    table = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"] + [f"| {' | '.join(r)} |" for r in rows]
    pairs = "without" if args.no_pairs else "with"
    command = " ".join(["python benchmarks/mixed_precision.py", *sys.argv[1:]])
    note = (
        f"SST-2 dev accuracy ({len(dev)} sentences); {num_samples} calibration sentences from train; mixed = the "
        f"ILP's choice from {args.candidates} at that average, {pairs} pair terms; block Linears MiB = packed "
        f"codes + scales + zero points. Machine: {_common.machine()}. Date: {datetime.date.today()}. "
        f"Command: `{command}`"
    )
    text = "\n".join([note, "", *table])
    print(text)
    if readme:
        write_table(Path(readme), text)


def write_table(path: Path, text: str) -> None:
    """Replaces what lies between the markers, or appends a section with them."""
    block = _common.section(MARKER, text)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in old and END in old:
        new = _common.replace_between_markers(old, MARKER, block, where=str(path))
    else:
        new = old.rstrip("\n") + "\n\n## Mixed precision vs uniform at the same budget\n\n" + block + "\n"
    path.write_text(new)
    print(f"Table written to {path}")


if __name__ == "__main__":
    main()
