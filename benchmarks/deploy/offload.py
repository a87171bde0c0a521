"""Quantizing a model larger than the memory budget: OPT-1.3b-shaped (5.3 GB in fp32) under disk offload.

Three measured runs, each in a fresh process so that its peak resident memory (`ru_maxrss`) is its own:
  large:   the OPT-1.3b-shaped model loaded with `device_map={"": "disk"}`, W4A8 QDrop with `work_dir` and a
           `cache_budget_bytes` (activation caches past it spill to memory-mapped files), `save_pretrained` in
           small shards; PASS when the peak RSS is at most `--rss_limit_gb` (1.5 GB).
  compare: an OPT-125m-shaped model quantized twice with the same seed and settings, once loaded in memory
           (caches in RAM), once with disk offload and spilled caches; the saved tensors must be identical.
The models have random weights (seeded): this measures memory and time, not accuracy. The table goes between
`<!-- offload-table:start -->` and `<!-- offload-table:end -->` of docs/results/offload.md (`offload_report` draws
it); the JSON into benchmarks/out/offload/.

    python -m benchmarks.deploy.offload --build   # once: writes the two random models (5.3 GB + 0.5 GB; ~12 GB RAM)
    python -m benchmarks.deploy.offload           # measure both, rewrite the doc's table
    python -m benchmarks.deploy.offload --quick   # a tiny OPT through the whole chain (< 1 min); prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.deploy.offload_child import child, folder_bytes, load_folder_state
from benchmarks.deploy.offload_report import (
    GB,
    LOAD_LABELS,
    MIB,
    compare_state_dicts,
    format_bytes,
    render_table,
    rss_verdict,
)

DOC = common.RESULTS_DOCS / "offload.md"
MARKER = "offload-table"
OUT = common.OUT / "offload"
PREFIX = "[deploy.offload]"

# OPTConfig arguments of the models built by --build (and --quick); real OPT shapes, random weights.
SHAPES: dict[str, dict[str, int]] = {
    "opt-1.3b": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "ffn_dim": 8192,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2048,
    },
    "opt-125m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "ffn_dim": 3072,
        "num_attention_heads": 12,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768,
    },
    "opt-tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "ffn_dim": 256,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "word_embed_proj_dim": 64,
    },
}
# --quick: every step of the chain on a model that loads in a second; the small cache budget forces spilling.
QUICK = {
    "large": "opt-tiny",
    "compare": "opt-tiny",
    "num_samples": 8,
    "seq_len": 32,
    "batch_size": 4,
    "iters": 5,
    "cache_budget_mib": 1 / 64,
    "compare_cache_budget_mib": 1 / 64,
}


def log(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


# ----------------------------------------------------------------------------------------------- building


def build_model(shape: str, out_dir: Path, seed: int) -> Path:
    """Writes an OPT of `shape` with random fp32 weights (seeded) to `out_dir`; skips a folder already written."""
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        log(f"{out_dir} exists: not rebuilt")
        return out_dir
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**SHAPES[shape])).eval()
    with torch.no_grad():  # explicit, so the weights do not depend on how transformers initialises
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.zero_()
            else:
                torch.nn.init.normal_(param, std=0.02)
    tmp = out_dir.with_name(out_dir.name + ".partial")  # a crash mid-write must not leave a folder that looks done
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")  # shards, so that loading never maps one 5 GB file
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    n = sum(p.numel() for p in model.parameters())
    log(
        f"built {shape}: {n / 1e6:.0f}M parameters, {format_bytes(folder_bytes(out_dir))} in {out_dir} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return out_dir


# ----------------------------------------------------------------------------------------------- child process


def run_child(name: str, spec: dict[str, Any], scratch: Path, keep_scratch: bool) -> dict[str, Any]:
    """Runs one measured run in a fresh interpreter; its result, or {"error": ...} when the process failed."""
    run_scratch = scratch / name
    shutil.rmtree(run_scratch, ignore_errors=True)  # a stale offload folder or work_dir would change the run
    run_scratch.mkdir(parents=True)
    shutil.rmtree(spec["save_dir"], ignore_errors=True)
    if spec["load"] != "memory":
        spec["offload_folder"] = str(run_scratch / "offload")
    spec["result"] = str(run_scratch / "result.json")
    spec_path = run_scratch / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, "-m", "benchmarks.deploy.offload", "--child", str(spec_path)]
    log(f"{name}: {spec['shape']} ({LOAD_LABELS[spec['load']]}): {shlex.join(cmd)}")
    started = time.perf_counter()
    code = subprocess.run(cmd, check=False).returncode  # output streams through: progress stays visible
    wall = time.perf_counter() - started
    if code != 0 or not Path(spec["result"]).is_file():
        log(f"{name}: FAILED (exit code {code})")
        result: dict[str, Any] = {"error": f"exit code {code}", "spec": spec}
    else:
        result = json.loads(Path(spec["result"]).read_text())
        log(
            f"{name}: peak RSS {format_bytes(result['peak_rss_bytes'])} (after loading "
            f"{format_bytes(result['peak_rss_after_load_bytes'])}), quantize {result['seconds']['quantize']:.1f} s, "
            f"total {result['seconds']['total']:.1f} s, process {wall:.1f} s"
        )
    result["process_seconds"] = wall
    if not keep_scratch:
        for sub in ("offload", "work"):  # GBs for the large model; the spec and result stay for reference
            shutil.rmtree(run_scratch / sub, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line; `parse_args` adds what --quick changes and the derived `shapes` and `dirs`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="Only build the random models (skips existing ones).")
    parser.add_argument("--quick", action="store_true", help="A tiny OPT through every step; the doc untouched.")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["large", "compare"],
        choices=["large", "compare"],
        help="large: the 1.3b run under offload; compare: 125m in memory vs offload.",
    )
    parser.add_argument("--out_dir", type=Path, default=OUT, help="Models, quantized folders, scratch and JSON.")
    parser.add_argument(
        "--large_dir", type=Path, default=None, help="The 1.3b model folder (default OUT/opt-1.3b-random)."
    )
    parser.add_argument("--compare_dir", type=Path, default=None, help="The 125m folder (default OUT/opt-125m-random).")
    parser.add_argument("--load", default="disk", choices=["disk", "cpu", "auto"], help="device_map of the large run.")
    parser.add_argument("--num_samples", type=int, default=16, help="Calibration samples.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per calibration sample.")
    parser.add_argument("--batch_size", type=int, default=4, help="Reconstruction batch size.")
    parser.add_argument("--iters", type=int, default=10, help="QDrop iterations per block (memory, not accuracy).")
    parser.add_argument("--method", default="qdrop", choices=["rtn", "adaround", "brecq", "qdrop"])
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the calibration data and QDrop.")
    parser.add_argument("--cache_budget_mib", type=float, default=64, help="cache_budget_bytes of the large run, MiB.")
    parser.add_argument(
        "--compare_cache_budget_mib",
        type=float,
        default=1,
        help="cache_budget_bytes of the offloaded 125m run, MiB: small, so that its caches spill.",
    )
    parser.add_argument("--max_shard_size", default="200MB", help="save_pretrained shard size of the quantized models.")
    parser.add_argument(
        "--rss_limit_gb", type=float, default=1.5, help="Peak RSS target of the large run, in 10^9 bytes."
    )
    parser.add_argument("--device", default=None, help="Execution device for quantize_qlimit (default: its own).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads in the runs (default: OMP's).")
    parser.add_argument("--strict", action="store_true", help="Exit non-zero on an RSS FAIL or unequal tensors.")
    common.add_doc_arguments(parser, DOC)
    parser.add_argument("--keep_scratch", action="store_true", help="Keep offload folders and work_dirs.")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # one measured run (internal)
    parser.add_argument(
        "--from_results",
        type=Path,
        nargs="+",
        default=None,
        help="Run nothing: rewrite the doc's table from these results.json files (e.g. an RTN large "
        "run and a QDrop comparison made separately), one table each.",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.out_dir = args.out_dir / "quick"
        for key in ("num_samples", "seq_len", "batch_size", "iters", "cache_budget_mib", "compare_cache_budget_mib"):
            setattr(args, key, QUICK[key])
    args.shapes = (
        {"large": QUICK["large"], "compare": QUICK["compare"]}
        if args.quick
        else {"large": "opt-1.3b", "compare": "opt-125m"}
    )
    args.dirs = {
        "large": args.large_dir or args.out_dir / f"{args.shapes['large']}-random",
        "compare": args.compare_dir or args.out_dir / f"{args.shapes['compare']}-random",
    }
    return args


def _mib(x: float) -> int:
    return round(x * MIB)


def plan_runs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The spec of each measured run of `args.parts`, by run name."""
    shapes, dirs, scratch = args.shapes, args.dirs, args.out_dir / "scratch"
    shared = {
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "seed": args.seed,
        "device": args.device,
        "num_threads": args.num_threads,
        "method": args.method,
        "max_shard_size": args.max_shard_size,
        "offload_folder": None,
    }
    runs: dict[str, dict[str, Any]] = {}
    if "large" in args.parts:
        runs["large"] = dict(
            shared,
            shape=shapes["large"],
            model_dir=str(dirs["large"]),
            load=args.load,
            work_dir=str(scratch / "large" / "work"),
            cache_budget_bytes=_mib(args.cache_budget_mib),
            save_dir=str(args.out_dir / f"{shapes['large']}-w4a8-{args.method}"),
        )
    if "compare" in args.parts:
        # The reference takes the path that predates offload (weights and caches in RAM); the other run takes the
        # offload path end to end, weights on disk and caches spilled, so equality covers both.
        runs["compare-memory"] = dict(
            shared,
            shape=shapes["compare"],
            model_dir=str(dirs["compare"]),
            load="memory",
            work_dir=None,
            cache_budget_bytes=None,
            save_dir=str(args.out_dir / f"{shapes['compare']}-w4a8-memory"),
        )
        runs["compare-disk"] = dict(
            shared,
            shape=shapes["compare"],
            model_dir=str(dirs["compare"]),
            load="disk",
            work_dir=str(scratch / "compare-disk" / "work"),
            cache_budget_bytes=_mib(args.compare_cache_budget_mib),
            save_dir=str(args.out_dir / f"{shapes['compare']}-w4a8-disk"),
        )
    return runs


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The two comparison runs' saved tensors compared, None when either run failed."""
    pair = [runs[k] for k in ("compare-memory", "compare-disk")]
    ok = all("error" not in r for r in pair)
    cmp = compare_state_dicts(*(load_folder_state(Path(r["save_dir"])) for r in pair)) if ok else None
    log(
        "compare: "
        + (
            "not made (a run failed)"
            if cmp is None
            else "equal"
            if cmp["equal"]
            else f"differ: max abs diff {cmp['max_abs_diff']:.3g} in {cmp['differing']}"
        )
    )
    return cmp


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Every planned run in its own process, the comparison and the settings (`meta`), as results.json holds them."""
    started = time.perf_counter()
    scratch = args.out_dir / "scratch"
    results: dict[str, Any] = {
        "runs": {name: run_child(name, spec, scratch, args.keep_scratch) for name, spec in plan_runs(args).items()}
    }
    if "compare" in args.parts:
        results["comparison"] = compare(results["runs"])
    limit = int(args.rss_limit_gb * GB)
    results["meta"] = {
        "date": datetime.date.today().isoformat(),
        "machine": common.machine(),
        "command": common.command("benchmarks.deploy.offload", argv),
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "method": args.method,
        "seed": args.seed,
        "cache_budget_bytes": _mib(args.cache_budget_mib),
        "compare_cache_budget_bytes": _mib(args.compare_cache_budget_mib),
        "compare_model": args.shapes["compare"],
        "rss_limit_bytes": limit,
        "quick": args.quick,
        "wall_seconds": time.perf_counter() - started,
    }
    if "large" in results["runs"]:
        results["rss_verdict"] = rss_verdict(results["runs"]["large"].get("peak_rss_bytes"), limit)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child)
        return None
    if args.from_results:
        saved = [json.loads(path.read_text()) for path in args.from_results]
        table = "\n\n".join(render_table(results, results["meta"]) for results in saved)
        common.publish(table, MARKER, common.doc_target(args), "deploy.offload")
        return None
    if args.build or args.quick:  # --quick builds its tiny model itself: the smoke test needs no other step
        for part in ("large", "compare") if args.build else sorted(set(args.parts)):
            build_model(args.shapes[part], args.dirs[part], args.seed)
        if args.build:
            return None
    for part in args.parts:
        if not (args.dirs[part] / "config.json").is_file():
            raise SystemExit(
                f"{PREFIX} {args.dirs[part]} does not exist: run `python -m benchmarks.deploy.offload --build` first."
            )

    results = measure(args, argv)
    table = render_table(results, results["meta"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / "table.md").write_text(table + "\n", encoding="utf-8")
    log(f"results in {args.out_dir / 'results.json'}")
    failed = [name for name, r in results["runs"].items() if "error" in r]
    verdict = results.get("rss_verdict")
    if verdict is not None:
        peak, limit = results["runs"]["large"].get("peak_rss_bytes"), results["meta"]["rss_limit_bytes"]
        log(f"{verdict}: peak RSS of the large run {format_bytes(peak)}, limit {format_bytes(limit)}")
    # a failed run must not replace a measured table
    common.publish(table, MARKER, None if args.quick or failed else common.doc_target(args), "deploy.offload")
    if failed:
        raise SystemExit(f"{PREFIX} runs failed: {', '.join(failed)}; see above.")
    unequal = results.get("comparison") is not None and not results["comparison"]["equal"]
    if args.strict and (verdict == "FAIL" or unequal):
        reasons = ["peak RSS over the limit"] if verdict == "FAIL" else []
        reasons += ["quantized tensors differ"] if unequal else []
        raise SystemExit(f"{PREFIX} --strict: " + ", ".join(reasons))
    return results


if __name__ == "__main__":
    main()
