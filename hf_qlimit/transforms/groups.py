"""The tensors the channel transforms act on: per block, the readers of one norm's output, as the adapter says.

An adapter lists groups (`norm_inputs`: the Linears reading one tensor) and, aligned with them, the norms that
produced it (`folding_norms(model)`; () where a residual also reads the norm's output). Groups fed by the same
norm (Phi's and Falcon's parallel attention and MLP) become one unit: one set of factors, folded once. A norm
without a per-channel weight (ModernBERT's first `attn_norm`, an Identity) leaves the factors as explicit ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..hf.layer_kinds import LINEAR_KINDS, expert_layout, expert_weights, layer_kind
from .channel import Readers, expert_inputs
from .fold import can_fold
from .input_op import InputTransform, matrix, wrap
from .support import model_type

if TYPE_CHECKING:
    from ..models.base import ArchitectureAdapter


@dataclass
class Unit:
    """One tensor of one block that the channel factors act on: the norm producing it (None: explicit ops), the
    module whose input (or, for a norm, output) the statistics read, and its readers."""

    norm: nn.Module | None
    readers: Readers

    def target(self) -> nn.Module:
        return self.norm if self.norm is not None else self.readers.ops[0]


def channel_units(model: nn.Module, adapter: ArchitectureAdapter) -> list[Unit]:
    """Every unit of every block, wrapping the Linears that read them in (still empty) ops. Every module the
    adapter names is looked up first, so a model whose layers differ is refused before anything changes."""
    norms = adapter.folding_norms(model)
    stack = adapter.single_stack(model, "The channel transforms (smoothquant, os_plus)")
    for b, block in enumerate(stack.blocks):
        for rel in [*norms, *(rel for group in adapter.norm_inputs for rel in group)]:
            _member(model, adapter, block, f"{stack.name}.{b}", rel)
    units: list[Unit] = []
    for b, block in enumerate(stack.blocks):
        by_norm: dict[str, Unit] = {}
        for g, group in enumerate(adapter.norm_inputs):
            norm_name = norms[g] if norms else ""
            norm = block.get_submodule(norm_name) if norm_name else None
            if not can_fold(norm):
                norm = None
            readers = _readers(model, adapter, block, f"{stack.name}.{b}.", group, folds=norm is not None)
            if norm is not None and norm_name in by_norm:
                merged = by_norm[norm_name].readers
                merged.ops += readers.ops
                merged.experts += readers.experts
                merged.fp += readers.fp
                continue
            unit = Unit(norm, readers)
            units.append(unit)
            if norm is not None:
                by_norm[norm_name] = unit
    return units


def _member(model: nn.Module, adapter: ArchitectureAdapter, block: nn.Module, block_name: str, rel: str) -> nn.Module:
    try:
        return block.get_submodule(rel)
    except AttributeError:
        raise ValueError(
            f"{type(adapter).__name__}: model type {model_type(model)!r}: block {block_name} has no {rel!r}, which "
            "the adapter names for the channel transforms: this model's layers differ from its family's usual "
            "structure, so smoothquant/os_plus are refused for it (hadamard_inputs works without)."
        ) from None


def _readers(
    model: nn.Module, adapter: ArchitectureAdapter, block: nn.Module, prefix: str, group: tuple[str, ...], folds: bool
) -> Readers:
    """The group's Linears behind ops; fused experts and full-precision readers (routers) where the norm folds."""
    readers = Readers()
    for rel in group:
        module, name = block.get_submodule(rel), prefix + rel
        if isinstance(module, (nn.Linear, Conv1D, InputTransform)):
            if isinstance(module, InputTransform) or layer_kind(model, name, module) in LINEAR_KINDS:
                parent, _, child = rel.rpartition(".")
                readers.ops.append(wrap(block.get_submodule(parent) if parent else block, child))
            elif folds:  # a Linear left in full precision (an MoE router): it must keep seeing the norm's output
                readers.fp.append(matrix(module))
        elif expert_weights(module):
            if not folds:
                raise ValueError(
                    f"{name}: fused MoE experts can only take channel factors through the norm in front of them, "
                    "and this model has none that folds; leave smoothquant/os_plus out."
                )
            readers.experts += expert_inputs(module, expert_layout(name, module))
        elif folds and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            readers.fp.append(module.weight)  # a router module computing F.linear(x, weight)
        else:
            raise ValueError(f"{name} ({type(module).__name__}) is no layer that channel factors can move into.")
    if not readers.ops and not readers.experts:
        raise ValueError(f"{type(adapter).__name__}: no quantized layer reads the group {group} in {prefix[:-1]}.")
    return readers
