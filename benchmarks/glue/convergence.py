"""Convergence of block reconstruction: one block's hard-rounded output error on held-out inputs, against the
number of iterations, for two schedules:

- `paper`: the papers' schedule (`preset="paper"`: β-annealed AdaRound from the FP weight on a fixed Lp grid, Adam
  lr 1e-3 for V, 4e-5 for the activation steps), only cut to fewer iterations, as the fast preset used it before;
- `default`: what `QLimitConfig()` does now at that number of iterations (the fast preset's schedule).

For each (model, schedule, iterations) a copy of the model cut to its first block is quantized by the ordinary
pipeline (QDrop, so the block sees the stream of the quantized embedding as in a full run). The error is the
mean over the real tokens of held-out inputs of the squared difference, summed over features, between the
quantized block's output and the FP block's output on FP inputs. At 0 iterations each schedule's starting point
is measured: round-to-nearest for `paper`, GPTQ's codes for `default`.

The table goes between `<!-- convergence-table:start -->` and `<!-- convergence-table:end -->` of
docs/design/short-budget-schedule.md.

    python -m benchmarks.glue.convergence                # both models, the doc's table
    python -m benchmarks.glue.convergence --models minilm --iters 100 500 --variant fast_lr='{"weight_lr": 3e-2}'
    python -m benchmarks.glue.convergence --table_only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import common
from benchmarks.common import REPO, SHARED, ResultsLog

DOC = REPO / "docs" / "design" / "short-budget-schedule.md"
MARKER = "convergence-table"
SCHEDULES: dict[str, dict[str, Any]] = {
    "paper": {"preset": "paper"},
    "default": {},
}
# Each model: where it is, its quantization setting, and how its calibration and held-out data are made.
MODELS: dict[str, dict[str, Any]] = {
    # QDrop's dropping stated: the table was measured with it, and `fast` now leaves it off by default
    "minilm": {
        "path": SHARED / "models" / "minilm-l6-stsb",
        "setting": {"weight_bits": 2, "act_bits": 8, "drop_prob": 0.5},
        "label": "MiniLM-L6 STS-B block 0, W2A8",
        "num_samples": 256,
        "batch_size": 32,
    },
    "smollm2": {
        "path": REPO / "models" / "smollm2-135m-instruct-q4_1",
        "label": "SmolLM2-135M block 0, W3 g64",
        "setting": {"weight_bits": 3, "act_bits": None, "group_size": 64, "first_last_bits": None},
        "num_samples": 32,
        "batch_size": 4,
        "seq_len": 256,
    },
}


def _cut_to_first_block(model: nn.Module) -> nn.Module:
    from hf_qlimit.models import get_adapter

    adapter = get_adapter(model)
    model.set_submodule(adapter.blocks_name(model), nn.ModuleList(adapter.blocks(model)[:1]))
    model.config.num_hidden_layers = 1
    return model


def _minilm_data(spec: dict) -> tuple[nn.Module, list[dict], list[dict]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["path"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["path"]).eval()

    def encode(split: str, n: int) -> list[dict]:
        glue_data = common.load_example("examples/glue/glue_data.py")
        ds = glue_data.read_glue_tsv(SHARED / "data" / "glue" / "STS-B" / f"{split}.tsv", "stsb").select(range(n))
        enc = tokenizer(list(ds["sentence1"]), list(ds["sentence2"]), truncation=True, max_length=128)
        return [{k: torch.tensor(enc[k][i]) for k in enc} for i in range(n)]

    return model, encode("train", spec["num_samples"]), encode("dev", 128)


def _smollm2_data(spec: dict) -> tuple[nn.Module, list[dict], list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not spec["path"].exists():
        raise SystemExit(
            f"{spec['path']} is missing: run `python -m hf_qlimit.cli.gguf_to_hf --output_dir {spec['path']}`."
        )
    run_ppl = common.load_example("examples/language-modeling/run_ppl.py")
    calibration_windows, eval_windows = run_ppl.calibration_windows, run_ppl.eval_windows
    read_text_file, tokenize_corpus = run_ppl.read_text_file, run_ppl.tokenize_corpus
    tokenizer = AutoTokenizer.from_pretrained(spec["path"])
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    wiki = SHARED / "data" / "wikitext-2"
    calib = calibration_windows(
        tokenize_corpus(tokenizer, read_text_file(wiki / "valid.txt")), spec["seq_len"], spec["num_samples"], seed=0
    )
    held = eval_windows(tokenize_corpus(tokenizer, read_text_file(wiki / "test.txt")), spec["seq_len"], 8)
    return model, calib, [{"input_ids": w} for w in held]


@torch.no_grad()
def _block_outputs(model: nn.Module, samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output of block 0, real-token mask) for each held-out sample, one at a time (no padding)."""
    from hf_qlimit.models import get_adapter

    block = get_adapter(model).blocks(model)[0]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        for sample in samples:
            model(**{k: v.unsqueeze(0) for k, v in sample.items()})
    finally:
        handle.remove()
    return [(s[0], torch.ones(s.shape[1], dtype=torch.bool)) for s in seen]


def held_out_error(fp: list, quantized: list) -> float:
    total = sum(((q - f).pow(2).sum(-1) * m).sum() for (f, m), (q, _) in zip(fp, quantized))
    return float(total / sum(m.sum() for _, m in fp))


def run_one(name: str, schedule: str, overrides: dict, iters: int, cache: dict) -> dict[str, Any]:
    import hf_qlimit  # noqa: F401  (registers quantize_qlimit)
    from hf_qlimit import QLimitConfig

    spec = MODELS[name]
    if name not in cache:
        model, calib, held = (_minilm_data if name == "minilm" else _smollm2_data)(spec)
        model = _cut_to_first_block(model)
        cache[name] = (model, calib, held, _block_outputs(model, held))
    model, calib, held, fp_out = cache[name]
    config = QLimitConfig(
        num_samples=spec["num_samples"],
        batch_size=spec["batch_size"],  # method: the preset's
        iters=iters,
        **spec["setting"],
        **overrides,
    )
    quantized = copy.deepcopy(model)
    torch.manual_seed(0)
    start = time.perf_counter()
    quantized.quantize_qlimit(calib, config)
    seconds = time.perf_counter() - start
    stats = quantized.qlimit_block_errors[0]
    return {
        "model": name,
        "schedule": schedule,
        "overrides": overrides,
        "iters": iters,
        "held_out_error": held_out_error(fp_out, _block_outputs(quantized, held)),
        "calib_error": stats["mse"],
        "calib_rtn_error": stats["rtn_mse"],
        "undecided": stats.get("undecided"),
        "seconds": seconds,
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch_threads": torch.get_num_threads(),
            "commit": common.commit(),
            "load": common.load_average(),
        },
    }


def render(rows: list[dict]) -> str:
    rows = [r for r in rows if r["schedule"] in SCHEDULES]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    iters = sorted({r["iters"] for r in rows})
    cell = {(r["model"], r["schedule"], r["iters"]): r for r in rows}
    head = ["iterations"] + [f"{MODELS[m]['label']}: {s}" for m in models for s in SCHEDULES]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for n in iters:
        out = [str(n)]
        for m in models:
            for s in SCHEDULES:
                r = cell.get((m, s, n))
                out.append(
                    "–"
                    if r is None
                    else f"{r['held_out_error']:.4g} ({r['undecided']:.0%} undecided, {r['seconds']:.0f} s)"
                )
        lines.append("| " + " | ".join(out) + " |")
    days, threads = common.measured(rows)
    loads = sorted(r["environment"]["load"] for r in rows)
    commits = sorted({r["environment"]["commit"] for r in rows})
    lines += [
        "",
        (
            "Held-out output error of the hard-rounded block (mean squared error per token, summed over features); in "
            "brackets the share of AdaRound's h still strictly between 0.01 and 0.99 before hard rounding, and the "
            "time "
            f"of the whole quantization of the one-block model. `paper`: {json.dumps(SCHEDULES['paper'])} at the given "
            "iterations; `default`: QLimitConfig's defaults at that many iterations (`fast` for MiniLM, `fast-lm` for "
            "SmolLM2; at 0 iterations GPTQ's codes). MiniLM: 256 STS-B train pairs, batch 32, 128 "
            "dev pairs held out. SmolLM2 (FP32 dequantized from its Q4_1 GGUF): 32 WikiText-2 valid windows of 256 "
            "tokens, batch 4, embedding and head left in FP, 8 test windows held out. "
            f"Measured {days} on {common.machine(threads)}, commit {', '.join(commits)}, load average "
            f"{loads[0]:.1f}-{loads[-1]:.1f} (2 cores shared with other jobs). Generated by "
            "`python -m benchmarks.glue.convergence`."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--schedules", nargs="*", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--iters", nargs="+", type=int, default=[0, 20, 100, 500, 2000])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="An extra schedule: QLimitConfig overrides as JSON (not in the doc's table).",
    )
    parser.add_argument("--results", type=Path, default=common.OUT / "convergence" / "results.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table_only", action="store_true")
    common.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    schedules = {s: SCHEDULES[s] for s in args.schedules}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        schedules[name] = json.loads(overrides)
    log = ResultsLog("glue.convergence", results=args.results)
    if not args.table_only:
        cache: dict = {}
        for name in args.models:
            for n in args.iters:
                for schedule, overrides in schedules.items():
                    row = run_one(name, schedule, overrides, n, cache)
                    shown = ("model", "schedule", "iters", "held_out_error", "calib_error", "undecided", "seconds")
                    print(json.dumps({k: row[k] for k in shown}), flush=True)
                    log.append(row)
    rows = log.records(lambda row: (row["model"], row["schedule"], row["iters"]))  # the newest row of each cell
    common.publish(render(list(rows.values())), MARKER, common.doc_target(args), "glue.convergence")


if __name__ == "__main__":
    main()
