"""Which transforms a model's structure allows, and the refusals that say why not.

- The channel transforms (SmoothQuant, OS+) move factors into the norm in front of a group of Linears, or leave an
  explicit op there: they need an adapter saying which Linears read one tensor and which norm produced it.
- `hadamard_down` needs an adapter naming the FFN's second Linear.
- `hadamard_inputs` needs no adapter: it puts an explicit rotation in front of every Linear (or Conv1D) of the
  blocks. Fused MoE experts read their input inside their own forward, so there is nowhere to put it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..hf.layer_kinds import expert_weights
from .names import CHANNEL

if TYPE_CHECKING:
    from ..models.base import ArchitectureAdapter

STRUCTURE = "norm_inputs, norms, attention_output, ffn_down"


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def block_experts(adapter: ArchitectureAdapter, model: nn.Module) -> list[str]:
    """The names of the fused MoE experts modules inside the blocks."""
    found = []
    for stack in adapter.stacks(model):
        found += [f"{stack.name}.{n}" for n, m in stack.blocks.named_modules() if n and expert_weights(m)]
    return found


def refusal(model: nn.Module, adapter: ArchitectureAdapter, names: list[str]) -> str | None:
    """Why `model` cannot take the transforms `names` (their base names), or None when it can."""
    who = f"{type(adapter).__name__}: model type {model_type(model)!r}"
    channel = [n for n in names if n in CHANNEL]
    if channel and not adapter.norm_inputs:
        return (
            f"{who} has no adapter saying which norms feed which Linears ({STRUCTURE}); the channel transforms "
            f"({', '.join(channel)}) need it. hadamard_inputs works without."
        )
    experts = block_experts(adapter, model) if {"hadamard_inputs", "hadamard_down"} & set(names) else []
    instead = (
        "smoothquant/os_plus apply (the router's weight takes the inverse factors)."
        if adapter.norm_inputs
        else "Leave the rotations out for this model."
    )
    if "hadamard_down" in names and experts:
        return (
            f"{who}: hadamard_down rotates the input of the FFN's second projection, which is computed inside the "
            f"fused MoE experts ({experts[0]}) and stays in full precision there: there is nothing to rotate. "
            + instead
        )
    if "hadamard_down" in names and not adapter.ffn_down:
        return (
            f"{who} has no adapter naming the FFN's second Linear (ffn_down); hadamard_down needs it. "
            "hadamard_inputs works without (it rotates the input of every Linear in the blocks)."
        )
    if "hadamard_inputs" in names and experts:
        return (
            f"{who}: hadamard_inputs rotates the input of every Linear in the blocks, but {experts[0]} holds fused "
            "MoE experts, which read their input inside their own forward: there is no Linear to put the rotation "
            "in front of, and rotating only the other Linears would leave the experts' input unrotated. " + instead
        )
    return None


def default_refusal(model: nn.Module, adapter: ArchitectureAdapter, names: list[str]) -> str | None:
    """Why the preset's transforms `names` are left out for `model` (None: they apply): `refusal`'s reasons, and
    an offloaded model, whose FP weights are not all in memory for the one calibration pass they need."""
    from ..forward import is_dispatched

    if is_dispatched(model):
        return "the model is offloaded (device_map), and the transforms need all its FP weights in memory"
    return refusal(model, adapter, names)
