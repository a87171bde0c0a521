"""The on-disk cache of measured sensitivities (`config.sensitivity_cache`): one JSON file, one entry per model,
calibration data and grid, so that another budget or a rerun skips the measurement."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import QLimitConfig
from ..models.base import ArchitectureAdapter
from .sensitivity import Sensitivity, measure_sensitivity

logger = logging.get_logger(__name__)

_CACHE_VERSION = 1


def cached_sensitivity(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: list[dict],
    config: QLimitConfig,
    device: torch.device,
    names: list[str],
    pairwise: bool,
) -> Sensitivity:
    """Measured, or read from `config.sensitivity_cache` when this model, data and grid were measured before."""
    path = config.sensitivity_cache
    if path and os.path.isdir(path):  # here, not in QLimitConfig: a loaded checkpoint's path means nothing locally
        raise ValueError(f"`sensitivity_cache` must be the path of a JSON file (not a folder), got {path!r}.")
    key = _cache_key(model, batches, config, names, pairwise) if path else None
    entry = _read_cache(path).get(key) if path else None
    if entry is not None:
        logger.info(f"Sensitivities read from {path}")
        singles = {n: {int(b): v for b, v in per.items()} for n, per in entry["singles"].items()}
        return Sensitivity(singles, {(a, b): v for a, b, v in entry["pairs"]})
    started = time.perf_counter()
    sens = measure_sensitivity(model, adapter, batches, config, device, names, pairwise)
    logger.info(f"Measured sensitivities in {time.perf_counter() - started:.1f}s")
    if path:
        entry = {
            "model_type": model.config.model_type,
            "bit_candidates": config.bit_candidates,
            "pairwise": pairwise,
            "num_samples": sum(len(b["input_ids"]) for b in batches),
            "singles": {n: {str(b): v for b, v in per.items()} for n, per in sens.singles.items()},
            "pairs": [[a, b, v] for (a, b), v in sens.pairs.items()],
        }
        _write_entry(path, key, entry)
    return sens


def _cache_key(model: nn.Module, batches: list[dict], config: QLimitConfig, names: list[str], pairwise: bool) -> str:
    """Model config + weights fingerprint + candidates + samples (and their tokens) + grid settings."""
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    model_config.pop("_name_or_path", None)
    settings = [_CACHE_VERSION, config.bit_candidates, config.group_size, config.weight_sym, config.weight_range_p]
    # Checkpoints of one architecture share a config: moments of the weights tell them apart, cheaply.
    weights = (model.get_submodule(n).weight.detach().double() for n in names)
    moments = [[w.sum().item(), w.pow(2).sum().item()] for w in weights]
    digest = hashlib.sha256(
        json.dumps([model_config, settings, config.seed, pairwise, moments], sort_keys=True, default=str).encode()
    )
    for batch in batches:  # the samples themselves, hence also their number
        for key in sorted(batch):
            digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    return data.get("entries", {}) if data.get("version") == _CACHE_VERSION else {}


def _write_entry(path: str, key: str, entry: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:  # re-read first: another run may have added its own entry meanwhile
        json.dump({"version": _CACHE_VERSION, "entries": {**_read_cache(path), key: entry}}, f, indent=1)
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves the old cache intact
