"""Per-channel migration of activation outliers into the next layers' weights (SmoothQuant, OS+).

For a tensor X read by the layers of one group (Q/K/V share X): X_j / s_j is quantized, W_{:,j} · s_j is
what the layers hold, so the product is unchanged. SmoothQuant's s_j = max|X_j|^α / max|W_{:,j}|^(1−α) evens
out the channels' ranges between activations and weights. OS+ first shifts each channel to the middle of its
range, δ_j = (max_j + min_j) / 2 (W·δ moves into the bias), which removes asymmetric outliers, then scales.

The readers of X are Linears (or Conv1D), which get an explicit op unless the norm in front absorbs it; fused
MoE experts, whose input projections take s directly (only where the norm absorbs it); and full-precision readers
such as an MoE router, whose weight takes s too, so that they still see the norm's original output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .input_op import InputTransform, add_shift_smooth, matrix

_MIN_SCALE = 1e-5
EXPERT_INPUTS = ("gate_up_proj", "gate_proj", "up_proj")  # transformers' fused experts: the hidden-size inputs


@dataclass
class Readers:
    """Every reader of one tensor in one block."""

    ops: list[InputTransform] = field(default_factory=list)  # quantized Linears, behind their op
    experts: list[torch.Tensor] = field(default_factory=list)  # experts' input weights as [E, out, in] views
    fp: list[torch.Tensor] = field(default_factory=list)  # full-precision readers' [out, in] weights (routers)

    def quantized_weights(self) -> list[torch.Tensor]:
        return [matrix(op.linear) for op in self.ops] + self.experts

    def takes_shift(self) -> bool:
        """OS+'s shift needs a bias in every reader to take W·δ: only groups of Linears that all have one."""
        return not self.experts and not self.fp and all(op.linear.bias is not None for op in self.ops)


def smoothing_factors(lo: torch.Tensor, hi: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s from the input's per-channel range and the [..., in] weights of every layer reading it."""
    act_max = torch.maximum(lo.abs(), hi.abs()).clamp(min=_MIN_SCALE)
    per_channel = [w.detach().abs().reshape(-1, w.shape[-1]).amax(0).float() for w in weights]
    weight_max = torch.stack(per_channel).amax(0).clamp(min=_MIN_SCALE)
    s = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    return s.clamp(min=_MIN_SCALE)


@torch.no_grad()
def migrate(
    readers: Readers, lo: torch.Tensor, hi: torch.Tensor, alpha: float, shift: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Applies the group's shift (OS+, only where every reader has a bias to take W·δ) and smoothing to its
    readers' weights; returns (δ, s) for the norm (or the explicit ops) to apply to the input."""
    delta = None
    if shift and readers.takes_shift():
        delta = (hi + lo) / 2
        lo, hi = lo - delta, hi - delta
    s = smoothing_factors(lo, hi, readers.quantized_weights(), alpha)
    for op in readers.ops:
        add_shift_smooth(op, delta, s)
    for weight in readers.experts + readers.fp:
        weight.mul_(s.to(weight))  # the input dimension is the last one
    return delta, s


def expert_inputs(experts: nn.Module, transposed: bool) -> list[torch.Tensor]:
    """The fused experts' input projections as [E, out, in] views ([E, in, out] storage is transposed back)."""
    found = [getattr(experts, name) for name in EXPERT_INPUTS if isinstance(getattr(experts, name, None), nn.Parameter)]
    if not found:
        raise ValueError(
            f"{type(experts).__name__} has none of {EXPERT_INPUTS}: the experts' input projections are unknown, so "
            "channel factors cannot move into them."
        )
    return [p.transpose(1, 2) if transposed else p for p in found]
