"""llama.cpp's own tools, as the GGUF benchmark calls them: convert, imatrix, quantize, perplexity, bench.

The build comes from `bash benchmarks/gguf/build_llama_cpp.sh` (under benchmarks/out/, git-ignored). Every call
runs the binary in its own process and parses what it prints; a tool that fails raises with the tail of its output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import common

ROOT = common.OUT / "llama.cpp"
BIN = ROOT / "build" / "bin"
SOURCE = ROOT / "src" / "llama.cpp"


def check_build() -> None:
    missing = [
        t for t in ("llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix") if not (BIN / t).is_file()
    ]
    if missing:
        raise SystemExit(f"llama.cpp tools {missing} not built: run `bash benchmarks/gguf/build_llama_cpp.sh` first.")


def run(args: list[str], threads: int = 1, env: dict[str, str] | None = None) -> str:
    """stdout + stderr of a llama.cpp tool (or a python script), raising with its tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.stdout


def convert(hf_folder: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own conversion of a transformers folder (its convert_hf_to_gguf.py, its own gguf-py)."""
    if not out.is_file():
        script = str(SOURCE / "convert_hf_to_gguf.py")
        cmd = [sys.executable, script, str(hf_folder), "--outtype", outtype, "--outfile", str(out)]
        run(cmd, env={"PYTHONPATH": str(SOURCE / "gguf-py")})  # its own gguf-py, not the venv's
    return out


def imatrix(model: Path, text: Path, out: Path, chunks: int, ctx: int, threads: int) -> Path:
    if not out.is_file():
        run([str(BIN / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
             "--chunks", str(chunks), "-t", str(threads)], threads)  # fmt: skip
    return out


def quantize(source: Path, out: Path, kind: str, options: list[str], threads: int) -> Path:
    if not out.is_file():
        run([str(BIN / "llama-quantize"), *options, str(source), str(out), kind, str(threads)], threads)
    return out


def perplexity(model: Path, text: Path, chunks: int, ctx: int, threads: int) -> float:
    """llama-perplexity's final estimate: chunks of `ctx` tokens, the second half of each scored."""
    out = run([str(BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx),
               "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)], threads)  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{out[-2000:]}")
    return float(found.group(1))


def bench(model: Path, threads: int, tokens: int = 64, repetitions: int = 3) -> float:
    """llama-bench's decode speed (tg`tokens`, tokens per second, mean of `repetitions`)."""
    out = run([str(BIN / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", str(repetitions), "-o", "json"], threads)  # fmt: skip
    start = out.index("[")
    return float(json.loads(out[start : out.rindex("]") + 1])[0]["avg_ts"])


def tensor_types(model: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (its `gguf` reader)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(model)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def add_bos(model: Path) -> bool:
    """Whether llama.cpp puts a BOS at the start of each perplexity chunk for this file."""
    import gguf

    field = gguf.GGUFReader(str(model)).get_field("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.contents())
