"""The offload benchmark's measured run, in its own process (`python -m benchmarks.deploy.offload --child SPEC`
runs `child`), and the light helpers it shares with `benchmarks.deploy.offload`: the peak RSS in bytes, the seeded
calibration data, folder sizes and a saved checkpoint's tensors. Everything heavy is imported inside the functions."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def peak_rss_bytes(ru_maxrss: int, platform: str = sys.platform) -> int:
    """`ru_maxrss` in bytes: Linux reports KiB, macOS bytes."""
    return ru_maxrss if platform == "darwin" else ru_maxrss * 1024


def calibration_data(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> list[dict[str, list[int]]]:
    """Unpadded samples of random token ids (above OPT's special ids 0-2), the same for a seed on any machine."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (num_samples, seq_len), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_folder_state(folder: Path) -> dict[str, Any]:
    """Every tensor of every safetensors shard in `folder`."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _load_kwargs(spec: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """`from_pretrained` arguments of the spec's `load`: in memory, on disk, or a device_map of "cpu" or "auto"."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec["load"] == "disk":
        kwargs.update(device_map={"": "disk"}, offload_folder=spec["offload_folder"])
    elif spec["load"] in ("cpu", "auto"):
        kwargs.update(device_map=spec["load"], offload_folder=spec["offload_folder"])
    return kwargs


def _qlimit_config(spec: dict[str, Any]) -> Any:
    """W4A8 with the spec's method (QDrop by default), samples, batch, iterations, length and seed."""
    from hf_qlimit import QLimitConfig

    return QLimitConfig(
        weight_bits=4,
        act_bits=8,
        method=spec.get("method", "qdrop"),
        num_samples=spec["num_samples"],
        batch_size=spec["batch_size"],
        iters=spec["iters"],
        max_length=spec["seq_len"],
        seed=spec["seed"],
    )


def child(spec_path: Path) -> None:
    """One measured run; writes its result JSON to spec["result"]. Everything heavy is imported here."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import AutoModelForCausalLM

    import hf_qlimit  # noqa: F401  (adds quantize_qlimit and registers the quantizer for save/load)

    if spec.get("num_threads"):
        torch.set_num_threads(spec["num_threads"])
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **_load_kwargs(spec, torch.float32))
    seconds["load"] = time.perf_counter() - started
    rss_after_load = peak_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    calib = calibration_data(spec["num_samples"], spec["seq_len"], model.config.vocab_size, spec["seed"])
    config = _qlimit_config(spec)
    t = time.perf_counter()
    model.quantize_qlimit(
        calib, config, device=spec["device"], work_dir=spec["work_dir"], cache_budget_bytes=spec["cache_budget_bytes"]
    )
    seconds["quantize"] = time.perf_counter() - t
    work_dir_bytes = folder_bytes(Path(spec["work_dir"])) if spec["work_dir"] else None  # spilled caches, state

    t = time.perf_counter()
    model.save_pretrained(spec["save_dir"], max_shard_size=spec["max_shard_size"])
    seconds["save"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    # measured last: ru_maxrss is the peak of the whole process so far, loading and saving included
    peak = peak_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {
        "model": spec["shape"],
        "load": spec["load"],
        "model_dir": spec["model_dir"],
        "model_bytes": folder_bytes(Path(spec["model_dir"])),
        "peak_rss_bytes": peak,
        "peak_rss_after_load_bytes": rss_after_load,
        "seconds": seconds,
        "block_errors": [dict(b) for b in getattr(model, "qlimit_block_errors", [])],
        "work_dir_bytes": work_dir_bytes,
        "offload_folder_bytes": folder_bytes(Path(spec["offload_folder"])) if spec["offload_folder"] else None,
        "saved_bytes": folder_bytes(Path(spec["save_dir"])),
        "save_dir": spec["save_dir"],
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "spec": spec,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
