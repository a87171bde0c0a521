"""The transform stage: function-preserving changes to the FP model, applied before anything is quantized.

Names (`QLimitConfig.transforms`), applied in this order whatever order they are listed in:
- "smoothquant" or "smoothquant@α": SmoothQuant's per-channel migration at every norm-fed input (Q/K/V, first
  FFN Linear(s)), α = 0.5 by default;
- "os_plus" or "os_plus@α": OS+: channel shift to the middle of each channel's range, then the same scaling;
- "hadamard_down": an online Hadamard rotation at the input of the FFN's second Linear (QuaRot's online R4);
- "hadamard_inputs": online Hadamard rotations at the input of every block Linear.
Channel factors fold into the norm where it feeds only those Linears (pre-LN OPT, Llama); elsewhere they and
the rotations stay explicit `InputTransform` ops that the checkpoint records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import logging

from ..forward import is_dispatched
from .channel import migrate
from .fold import fold_into_norm
from .input_op import InputTransform, wrap
from .names import CHANNEL, check_transforms
from .rotate import rotate_inputs
from .stats import channel_ranges

if TYPE_CHECKING:
    from ..config import QLimitConfig
    from ..models.base import ArchitectureAdapter

logger = logging.get_logger(__name__)


def _ops(block: nn.Module, names: Sequence[str]) -> list[InputTransform]:
    ops = []
    for rel in names:
        parent, _, child = rel.rpartition(".")
        ops.append(wrap(block.get_submodule(parent) if parent else block, child))
    return ops


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
    if not adapter.norm_inputs or not adapter.ffn_down:
        raise ValueError(f"The {type(adapter).__name__} does not say where transforms apply.")
    blocks = adapter.blocks(model)
    names = [base for base, _ in parsed]
    channel = [(base, alpha) for base, alpha in parsed if base in CHANNEL]
    if channel:
        base, alpha = channel[0]
        norms = adapter.folding_norms(model)
        groups = [(block, g, _ops(block, group)) for block in blocks for g, group in enumerate(adapter.norm_inputs)]
        targets = {f"{i}": ops[0] for i, (_, _, ops) in enumerate(groups)}
        ranges = channel_ranges(model, targets, batches, device)
        for i, (block, g, ops) in enumerate(groups):
            lo, hi = ranges[str(i)]
            norm = block.get_submodule(norms[g]) if norms else None
            shift = base == "os_plus" and (norm is None or getattr(norm, "bias", None) is not None)
            migrate(ops, lo.to(ops[0].linear.weight.device), hi.to(ops[0].linear.weight.device), alpha, shift)
            if norm is not None:
                fold_into_norm(norm, ops)
    for block in blocks:
        if "hadamard_inputs" in names:
            rotate_inputs(_ops(block, [rel for group in adapter.input_groups() for rel in group]))
        elif "hadamard_down" in names:
            rotate_inputs(_ops(block, [adapter.ffn_down]))
    _unwrap_empty(model)
    logger.info(f"Applied transforms {[n for n in config.transforms]} before quantization.")
