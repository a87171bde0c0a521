"""SmolLM2 ablation of the decoder default: initialiser × learned weight steps × iterations, on the peers
protocol (`benchmarks.peers.peer_eval`: the same calibration windows, evaluation windows and FP model).

Each variant is `QLimitConfig(weight_bits=B, group_size=64, act_bits=None, **overrides)` (act_bits=8 in the
setting "W4A8 g64"); the row "default" has no overrides, so it is what a user gets. One variant per process (its
own peak RSS, no state shared between runs); each result is appended to `--results` and the table is drawn from
the newest record of each (variant, setting), between `<!-- lm-ablation-table:start -->` and
`<!-- lm-ablation-table:end -->` of docs/results/language-modeling.md.

    python -m benchmarks.lm.ablation --settings "W3A16 g64" --variants rtn gptq default
    python -m benchmarks.lm.ablation --table_only
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ResultsLog, read_jsonl
from benchmarks.lm.table import DOC
from benchmarks.peers import peer_eval

OUT = common.OUT / "lm_ablation"
MARKER = "lm-ablation-table"
# (label, QLimitConfig overrides): rows in table order
# the decoder activations of the default before issue 32: static grids, attention matmuls quantized, no rotation
OLD_A8 = {"act_dynamic": False, "quantize_attention": True, "transforms": [], "prob_grid": "uniform"}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("RTN, Lp grid (0 it)", {"method": "rtn", "weight_range": "lp"}),
    "rtn-minmax": ("RTN, min-max grid (0 it)", {"method": "rtn", "weight_range": "minmax"}),
    "gptq": (
        "GPTQ init only (0 it), Lp grid",
        {"method": "rtn", "weight_init": "gptq", "weight_range": "lp", "gptq_act_order": False},
    ),
    "gptq-fp-head": (
        "GPTQ init only (0 it), min-max grid, act-order, embeddings and head FP",
        {
            "method": "rtn",
            "weight_init": "gptq",
            "weight_range": "minmax",
            "gptq_act_order": True,
            "first_last_bits": None,
        },
    ),
    "gptq-minmax": (
        "GPTQ init only (0 it), min-max grid",
        {"method": "rtn", "weight_init": "gptq", "weight_range": "minmax", "gptq_act_order": False},
    ),
    "gptq-actorder": (
        "GPTQ init only (0 it), Lp grid, act-order",
        {"method": "rtn", "weight_init": "gptq", "weight_range": "lp", "gptq_act_order": True},
    ),
    "gptq-minmax-actorder": (
        "GPTQ init only (0 it), min-max grid, act-order",
        {"method": "rtn", "weight_init": "gptq", "weight_range": "minmax", "gptq_act_order": True},
    ),
    "fixed-range": ("RTN init + 50 it signed steps, min/max fixed", {"learn_weight_scale": False}),
    "brecq": (
        'RTN init + 50 it signed steps + learned min/max, `method="brecq"` (the default\'s computation)',
        {"method": "brecq"},
    ),
    "qdrop": ("RTN init + 50 it signed steps + learned min/max, QDrop's input mixing at 0.5", {"drop_prob": 0.5}),
    "it20": ("RTN init + 20 it signed steps + learned min/max", {"iters": 20}),
    "default-lp": (
        "GPTQ init (Lp grid) + 50 it progressive AdaRound + learned steps (the default before 2026-11-29)",
        {
            "weight_range": "lp",
            "gptq_act_order": False,
            "rounding": "progressive",
            "weight_init": "gptq",
            "weight_lr": 3e-3,
        },
    ),
    "default-progressive": (
        "GPTQ init (min-max grid, act-order) + 50 it progressive AdaRound + learned steps (the "
        "default from 2026-11-29 until signed steps)",
        {"rounding": "progressive", "weight_init": "gptq", "weight_lr": 3e-3},
    ),
    "sign-gptq": (
        "GPTQ init (min-max grid, act-order) + 50 it signed steps + learned min/max",
        {"rounding": "sign", "weight_init": "gptq", "weight_lr": 5e-3},
    ),
    "batch4": (
        "RTN init + 50 it signed steps + learned min/max, batch 4 at every width (the default until 2026-11-30)",
        {"batch_size": 4},
    ),
    "batch8": (
        "RTN init + 50 it signed steps + learned min/max, batch 8 at every width (AutoRound's)",
        {"batch_size": 8},
    ),
    "default": (
        "**default**: RTN init (min-max grid) + 50 it signed steps + learned min/max, batch 4 (8 at W2), "
        "no input mixing when weight-only",
        {},
    ),
    "it200": ("RTN init + 200 it signed steps + learned min/max", {"iters": 200}),
    # W4A8 rows before issue 32: the default with activations was QDrop (input mixing 0.5) with static grids
    # and learned activation steps, attention matmuls included
    "a8-first-log2": (
        "W4A8: the default + first token (attention sink) in FP + log2 8-bit probabilities",
        {**OLD_A8, "act_fp_first_token": True, "prob_grid": "log2"},
    ),
    "a8-dynamic": (
        "W4A8: the default with **dynamic per-token** Linear inputs (not static)",
        {**OLD_A8, "act_dynamic": True},
    ),
    # since issue 32 the decoder default with activations has per-token Linear inputs, the FFN down input
    # rotated and the attention matmuls in FP; these rows vary one choice of it
    "a8-brecq": ("W4A8: the default without QDrop's input mixing (`drop_prob=0`)", {"drop_prob": 0.0}),
}
# the peers' weight-only settings, and W4A8 (issue 19: static per-tensor 8-bit activations, attention matmuls too)
SETTINGS = {**peer_eval.SETTINGS["smollm2"], "W4A8 g64": peer_eval.Setting("W4A8 g64", 4, 64, 8)}
BATCH_ROWS = ("default", "batch4", "batch8")  # one computation at a given batch: each run fills every row it is


def default_batch(setting: str) -> int:
    """The batch the decoder default reconstructs with at this setting's weight width."""
    return peer_eval.default_batch("smollm2", SETTINGS[setting].weight_bits)


def _file_under_batch_rows(out: dict, record: dict[str, Any]) -> None:
    batch = record.get("batch_size")
    rows = [f"batch{batch}"] + (["default"] if batch == default_batch(record["setting"]) else [])
    if SETTINGS[record["setting"]].act_bits is not None:  # the batch rows are weight-only studies
        rows = rows[-1:] if rows[-1] == "default" else []
    for row in rows:
        if row in VARIANTS:
            out[row, record["setting"]] = {**record, "variant": row}


def run_one(variant: str, label: str, threads: int) -> dict[str, Any]:
    """Quantizes and evaluates in this process (called in a child by `main`)."""
    import resource

    import torch

    import hf_qlimit  # noqa: F401  (registers quantize_qlimit)
    from hf_qlimit import QLimitConfig

    torch.set_num_threads(threads)
    net, tokenizer = peer_eval.load_fp("smollm2", peer_eval.model_path("smollm2"))
    if variant == FP:  # the reference perplexity, where the peers sitting's record is not at hand
        metric = peer_eval.evaluate("smollm2", net, tokenizer)
        return {
            "variant": FP_TOOL,
            "setting": "FP32",
            "ppl": metric["ppl"],
            "quantize_s": 0.0,
            "threads": threads,
            "date": datetime.date.today().isoformat(),
            "commit": common.commit(),
            "load": common.load_average(),
        }
    setting = SETTINGS[label]
    calib = peer_eval.calibration("smollm2", tokenizer)
    config = QLimitConfig(
        weight_bits=setting.weight_bits,
        group_size=setting.group_size,
        act_bits=setting.act_bits,
        **VARIANTS[variant][1],
    )
    resolved = config.for_model(net)
    tick = time.perf_counter()
    net.quantize_qlimit(calib, config)
    seconds = time.perf_counter() - tick
    metric = peer_eval.evaluate("smollm2", net, tokenizer)
    return {
        "variant": variant,
        "setting": label,
        "ppl": metric["ppl"],
        "quantize_s": seconds,
        "threads": threads,
        "iters": resolved.iters if resolved.method != "rtn" else 0,
        "weight_init": resolved.weight_init,
        "learn_weight_scale": resolved.learn_weight_scale,
        "num_samples": min(resolved.num_samples, len(calib)),
        "batch_size": resolved.batch_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "date": datetime.date.today().isoformat(),
        "commit": common.commit(),
        "load": common.load_average(),
    }


PEERS_RESULTS = OUT.parent / "peers" / "results.jsonl"
FP_TOOL = "FP32 (reference)"  # the peers sitting's unquantized row: the FP perplexity in the note
FP = "fp"  # `--variants fp`: measure that reference here
PEER_ROWS = {
    "llm-compressor GPTQ": "*peer:* llm-compressor GPTQ (min-max grid, FP head)",
    "AutoRound": "*peer:* AutoRound, its light recipe (50 it, FP head)",
}


def _peer_records(peers: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The peers sitting's SmolLM2 rows this table shows: its FP reference, the peers named in PEER_ROWS, and its
    "hf_qlimit default" runs filed under the variant that default was on their date."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in read_jsonl(peers):
        if r.get("model") != "smollm2" or r.get("status") != "ok":
            continue
        if r.get("tool") in PEER_ROWS or r.get("tool") == FP_TOOL:
            out[r["tool"], r["setting"]] = {
                "variant": r["tool"],
                "setting": r["setting"],
                "ppl": r["metric"]["ppl"],
                "quantize_s": r["calib_s"],
                "peer": True,
                "date": r["date"],
            }
        if r.get("tool") == "hf_qlimit default":
            # the decoder default changed twice on 2026-11-29: the Lp grid, then min-max, then signed steps
            details = r.get("details", "")
            variant = (
                "default"
                if "drop_prob 0.0" in details and "rounding sign" in details
                else "qdrop"
                if "rounding sign" in details
                else "default-progressive"
                if "range minmax" in details
                else "default-lp"
            )
            record = {
                "variant": variant,
                "setting": r["setting"],
                "ppl": r["metric"]["ppl"],
                "quantize_s": r["calib_s"],
                "threads": 1,
                "date": r["date"],
                "commit": "peers run",
                "load": None,
                "batch_size": peer_eval.details_batch(details),
            }
            if variant == "default":
                _file_under_batch_rows(out, record)
            else:
                out[variant, r["setting"]] = record
    return out


def load(path: Path, peers: Path | None = PEERS_RESULTS) -> dict[tuple[str, str], dict[str, Any]]:
    """This script's records, and the peers sitting's "hf_qlimit default" runs as the "default" row (the same
    protocol and config, so it is not run twice); a record of this script made later wins."""
    out = _peer_records(peers) if peers is not None else {}
    for record in read_jsonl(path):
        if record["variant"] in BATCH_ROWS:
            _file_under_batch_rows(out, record)
        else:
            out[record["variant"], record["setting"]] = record
    return out


def render(records: dict[tuple[str, str], dict[str, Any]]) -> str:
    settings = [s for s in SETTINGS if any(k[1] == s for k in records)]
    lines = ["| variant | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    rows = [(v, label) for v, (label, _) in VARIANTS.items()] + list(PEER_ROWS.items())
    for variant, label in rows:
        cells = []
        for setting in settings:
            r = records.get((variant, setting))
            if r is None:
                cells.append("–")
                continue
            extra = "" if r.get("threads", 1) == 1 else f", {r['threads']} threads"
            other_batch = r.get("batch_size") not in (None, default_batch(setting))
            if other_batch and r.get("iters") != 0 and variant not in BATCH_ROWS:
                extra += f", batch {r['batch_size']}"  # not the default's batch at this width
            cells.append(f"{r['ppl']:.2f} ({r['quantize_s'] / 60:.0f} min{extra})")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    done = [r for r in records.values() if not r.get("peer")]
    loads = [r["load"] for r in done if r.get("load") is not None]
    fp = records.get((FP_TOOL, "FP32"))
    fp_ppl = "–" if fp is None else f"{fp['ppl']:.2f}"
    machine = common.machine(threads=1).replace(" (1 threads)", "")
    lines += [
        "",
        f"SmolLM2-135M-Instruct, WikiText-2 test perplexity over the peers protocol's {peer_eval.LM_EVAL_WINDOWS} "
        f"windows of {peer_eval.LM_SEQ_LEN} tokens (FP {fp_ppl}); "
        f"{peer_eval.LM_CALIB_WINDOWS} calibration windows; weight-only, groups of 64, embeddings and head at 8 bits "
        "unless a row says FP. The W4A8 column quantizes activations to 8 bits, and its default row is the decoder "
        "default with activations since issue 32 (QDrop's input mixing at 0.5, per-token Linear inputs, the FFN down "
        "input rotated, attention matmuls in FP). "
        f"In parentheses: the quantization call's wall time on {machine}, one torch thread "
        f"unless the cell says more, load average "
        f"at the end of this script's runs {min(loads, default=0):.1f}–{max(loads, default=0):.1f}; the peers "
        "sitting's runs shared the two cores with 2 to 4 jobs, so every time here is inflated. The default row comes "
        "from the peers sitting (`python -m benchmarks.peers.run`, same protocol) where this script did not run it."
        f" Dates: {', '.join(sorted({r['date'] for r in done}))}; commits: "
        f"{', '.join(sorted({r['commit'] for r in done}))}. Generated by `python -m benchmarks.lm.ablation`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["rtn", "gptq", "default"], choices=[*VARIANTS, FP])
    parser.add_argument("--settings", nargs="+", default=["W3A16 g64"], choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument(
        "--peers_results", type=Path, default=PEERS_RESULTS, help="Where the default and peer rows may come from."
    )
    parser.add_argument("--table_only", action="store_true")
    common.add_doc_arguments(parser, DOC, MARKER)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one variant in its own process: its own peak RSS, no state shared between runs
        common.emit_result(run_one(*args.child, args.threads))
        return
    records = load(args.results, args.peers_results)
    log = ResultsLog("lm.ablation", env=common.offline_env(args.threads), results=args.results)
    for setting in [] if args.table_only else args.settings:
        for variant in args.variants:
            if ((FP_TOOL, "FP32") if variant == FP else (variant, setting)) in records and not args.rerun:
                continue
            child = ["-m", "benchmarks.lm.ablation", "--child", variant, setting, "--threads", str(args.threads)]
            record = log.run_child(child, f"{variant} | {setting}")
            if record is not None:
                log.log(f"  ppl {record['ppl']:.2f}, {record['quantize_s']:.0f} s")
                records = load(args.results, args.peers_results)
    common.publish(render(records), args.marker, common.doc_target(args), "lm.ablation")
    log.check()


if __name__ == "__main__":
    main()
