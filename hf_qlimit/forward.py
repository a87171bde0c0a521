"""Running a transformers model's forward pass outside the quantized modules: moving (nested) batches and block
arguments to a device, reading a block's hidden states and a model's logits, telling whether accelerate dispatches
the model.

Shared by the calibration engine, mixed precision's sensitivity measurement and the transforms' statistics pass.
It lives at the package top and imports nothing from hf_qlimit, so those packages share it without importing
each other (tests/test_import_rules.py holds it to that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """`obj` with `fn` applied to every tensor inside its (nested) tuples, lists and dicts, which are rebuilt
    (namedtuples keep their type, dicts come back plain); any other value is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: map_tensors(fn, value) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: its fields are positional arguments
        return type(obj)(*(map_tensors(fn, value) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, value) for value in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch or argument structure, moved to `device`."""
    return map_tensors(lambda x: x.to(device), obj)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns, whether alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def output_logits(output: Any) -> list[torch.Tensor]:
    """The logits tensors of a model's output (`logits`, `start_logits`, `end_logits`...), in output order."""
    return [v for k, v in output.items() if k.endswith("logits") and isinstance(v, torch.Tensor)]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks manage some of the model's modules (offloaded or spread over devices)."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())
