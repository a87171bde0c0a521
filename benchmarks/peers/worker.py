"""One (tool, model, setting) run of the peers benchmark, in its own process and under the tool's interpreter.

    python -m benchmarks.peers.worker --tool quanto --algo rtn --model minilm-sst2 --setting "W4A16 g128" \
        --out_dir benchmarks/out/peers/ckpt/x --result /tmp/x.json

Run from the repository root (`benchmarks.peers.run` does, and puts it on PYTHONPATH): the peers' interpreters do
not have this checkout installed, and find `benchmarks` and `hf_qlimit` there.

Loads the FP model, quantizes it with `tool_<tool>.quantize` (timed: the calibration wall time), saves it in the
tool's own format (`tool_<tool>.save`; its size on disk is the checkpoint size), evaluates the quantized model in
memory and writes one JSON object to `--result`: status "ok", "unsupported" (the tool cannot do the setting) or
"error" (an exception), with a one-line error, the metric, the times and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks.peers import peer_eval


def one_line(exc: BaseException) -> str:
    """'Type: message' on one line: the message's first line, and the next ones while it is short (no model reprs)."""
    text = f"{type(exc).__name__}:"
    for line in str(exc).splitlines():
        text += " " + line.strip()
        if len(text) >= 100:
            break
    return text if len(text) <= 300 else text[:297] + "..."


def versions(tool: object | None) -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    out.update(getattr(tool, "versions", dict)() if tool is not None else {})
    return out


def run(args: argparse.Namespace) -> dict:
    setting = peer_eval.setting(args.model, args.setting)
    result: dict = {"status": "error", "python": sys.executable}
    tool = None
    try:
        peer_eval.single_thread()
        tool = importlib.import_module(f"benchmarks.peers.tool_{args.tool}")
        result["versions"] = versions(tool)
        options = {"iters": args.iters}
        tool.check(args.algo, args.model, setting, options)  # raises Unsupported before any work
        path = peer_eval.model_path(args.model)
        tick = time.perf_counter()
        load = getattr(tool, "load", None)  # a tool that loads the model itself (GPTQModel)
        net, tokenizer = load(args.model, path, setting) if load else peer_eval.load_fp(args.model, path)
        calib = peer_eval.calibration(args.model, tokenizer)
        result["load_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        net = tool.quantize(net, calib, setting, args.algo, args.model, options)
        result["calib_s"] = time.perf_counter() - tick
        result["details"] = options.get("details", "")
        out_dir = Path(args.out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        try:
            tool.save(net, out_dir)
            result["ckpt_bytes"] = peer_eval.dir_bytes(out_dir)
        except Exception as exc:  # noqa: BLE001 - the metric still counts; the size cell says why there is none
            traceback.print_exc()
            result["save_error"] = one_line(exc)
        tick = time.perf_counter()
        result["metric"] = peer_eval.evaluate(args.model, getattr(tool, "eval_model", lambda m: m)(net), tokenizer)
        result["eval_s"] = time.perf_counter() - tick
        result["status"] = "ok"
    except peer_eval.Unsupported as exc:
        result.update(status="unsupported", error=str(exc))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row of the table
        traceback.print_exc()
        result.update(status="error", error=one_line(exc))
        if "versions" not in result and "torch" in sys.modules and "transformers" in sys.modules:
            result["versions"] = versions(None)
    result["peak_rss_mb"] = peer_eval.peak_rss_mb()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, help="Module benchmarks.peers.tool_<TOOL>.")
    parser.add_argument("--algo", required=True, help="The tool's algorithm: rtn, gptq, awq, smoothquant, brecq...")
    parser.add_argument("--model", required=True, choices=sorted(peer_eval.SETTINGS))
    parser.add_argument("--setting", required=True)
    parser.add_argument("--iters", type=int, default=None, help="Reconstruction iterations per block (hf_qlimit).")
    parser.add_argument("--out_dir", required=True, help="Where the checkpoint is written (replaced).")
    parser.add_argument("--result", required=True, help="JSON file the result is written to.")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.result).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0 if result["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
