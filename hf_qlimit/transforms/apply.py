"""The transform stage: function-preserving changes to the FP model, applied before anything is quantized.

Names (`QLimitConfig.transforms`), applied in this order whatever order they are listed in:
- "smoothquant" or "smoothquant@α": SmoothQuant's per-channel migration at every norm-fed input (Q/K/V, first
  FFN Linear(s)), α = 0.5 by default;
- "os_plus" or "os_plus@α": OS+: channel shift to the middle of each channel's range, then the same scaling;
- "hadamard_down": an online Hadamard rotation at the input of the FFN's second Linear (QuaRot's online R4);
- "hadamard_inputs": online Hadamard rotations at the input of every block Linear (any model: no adapter needed).
Channel factors fold into the norm where it feeds only those Linears (pre-LN OPT, Llama, Gemma's (1+w) norms;
one norm feeding attention and MLP in parallel, Phi and Falcon, gets one set of factors for both); elsewhere
they and the rotations stay explicit `InputTransform` ops that the checkpoint records. What a model's structure
does not allow is refused (support.py); the transformed model's block outputs are checked against the FP ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import logging

from ..forward import block_output, is_dispatched, to_device
from ..hf.layer_kinds import LINEAR_KINDS, layer_kind
from .channel import migrate
from .fold import fold_into_norm
from .groups import Unit, channel_units
from .input_op import InputTransform, wrap
from .names import CHANNEL, check_transforms
from .rotate import rotate_inputs
from .stats import channel_ranges
from .support import model_type, refusal

if TYPE_CHECKING:
    from ..config import QLimitConfig
    from ..models.base import ArchitectureAdapter

logger = logging.get_logger(__name__)


def _op(block: nn.Module, rel: str) -> InputTransform:
    parent, _, child = rel.rpartition(".")
    return wrap(block.get_submodule(parent) if parent else block, child)


def _unwrap_empty(model: nn.Module) -> None:
    """Wrappers left with no op (their factors folded into a norm) give back the plain Linear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, InputTransform) and module.shift is None and module.smooth is None and not module.rotate:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.linear)


@torch.no_grad()
def apply_transforms(
    model: nn.Module, adapter: ArchitectureAdapter, config: QLimitConfig, batches: list, device: torch.device
) -> None:
    """Applies `config.transforms` to the FP `model` in place (its outputs stay the same up to float rounding)."""
    parsed = check_transforms(getattr(config, "transforms", None))
    if not parsed:
        return
    if is_dispatched(model):
        raise ValueError("`transforms` need the whole FP model in memory (one calibration pass); not with offload.")
    names = [base for base, _ in parsed]
    refused = refusal(model, adapter, names)
    if refused is not None:
        raise ValueError(refused)
    channel = [(base, alpha) for base, alpha in parsed if base in CHANNEL]
    units = channel_units(model, adapter) if channel else []  # refuses a model unlike its adapter; ops still empty
    reference = _last_block_output(model, adapter, batches[0], device)
    if channel:
        _migrate_channels(model, units, channel[0], batches, device)
    if "hadamard_inputs" in names:
        rotate_inputs(_every_block_linear(model, adapter))
    elif "hadamard_down" in names:
        rotate_inputs([_op(block, adapter.ffn_down) for block in adapter.blocks(model)])
    _unwrap_empty(model)
    _check_preserved(model, adapter, reference, batches[0], device)
    logger.info(f"Applied transforms {[n for n in config.transforms]} before quantization.")


def _migrate_channels(
    model: nn.Module, units: list[Unit], transform: tuple[str, float], batches: list, device: torch.device
) -> None:
    base, alpha = transform
    targets = {str(i): unit.target() for i, unit in enumerate(units)}
    norms = frozenset(str(i) for i, unit in enumerate(units) if unit.norm is not None)
    ranges = channel_ranges(model, targets, batches, device, outputs=norms)
    for i, unit in enumerate(units):
        lo, hi = ranges[str(i)]
        where = unit.readers.quantized_weights()[0].device
        shift = base == "os_plus" and (unit.norm is None or getattr(unit.norm, "bias", None) is not None)
        delta, s = migrate(unit.readers, lo.to(where), hi.to(where), alpha, shift)
        if unit.norm is not None:
            weight = unit.norm.weight
            fold_into_norm(unit.norm, None if delta is None else delta.to(weight), s.to(weight))
            for op in unit.readers.ops:
                op.clear_channel_ops()


def _every_block_linear(model: nn.Module, adapter: ArchitectureAdapter) -> list[InputTransform]:
    """An op in front of every Linear (or Conv1D) of every block that gets quantized (not routers)."""
    found: list[tuple[nn.Module, str]] = []
    for stack in adapter.stacks(model):
        for rel, module in stack.blocks.named_modules():
            parent_name, _, child = rel.rpartition(".")
            parent = stack.blocks.get_submodule(parent_name)
            if isinstance(parent, InputTransform):
                continue  # the layer inside an op: the op is the one to rotate
            if isinstance(module, InputTransform) or layer_kind(model, f"{stack.name}.{rel}", module) in LINEAR_KINDS:
                found.append((parent, child))
    return [wrap(parent, child) for parent, child in found]


def _last_block_output(
    model: nn.Module, adapter: ArchitectureAdapter, batch: dict, device: torch.device
) -> torch.Tensor:
    """The hidden states the model's last block returns on `batch` (the transforms change nothing after it)."""
    last = adapter.stacks(model)[-1].blocks[-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda m, a, out: seen.append(block_output(out).detach().float()))
    try:
        model(**to_device(batch, device), use_cache=False)
    finally:
        handle.remove()
    return seen[-1]


def _check_preserved(
    model: nn.Module, adapter: ArchitectureAdapter, reference: torch.Tensor, batch: dict, device: torch.device
) -> None:
    """Refuses a transformed model whose last block output moved beyond float rounding: a structure that the
    adapter describes wrongly for this model (a layer reading a tensor the adapter does not know of)."""
    got = _last_block_output(model, adapter, batch, device)
    error = float((got - reference).norm() / reference.norm().clamp(min=1e-12))
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 0.1
    logger.info(f"Transforms: relative change of the last block's FP output {error:.2g}.")
    if not error <= tolerance:
        raise ValueError(
            f"The transforms changed the FP output of model type {model_type(model)!r} ({type(adapter).__name__}): "
            f"relative error {error:.2g} at the last block's output, beyond {tolerance:g}. Its structure is not what "
            "the adapter says (a layer reads a transformed tensor that the adapter does not name); the model is "
            "left modified: reload it, and quantize without `transforms`."
        )
