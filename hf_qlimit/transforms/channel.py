"""Per-channel migration of activation outliers into the next Linears' weights (SmoothQuant, OS+).

For a tensor X read by the Linears of one group (Q/K/V share X): X_j / s_j is quantized, W_{:,j} · s_j is
what the Linears hold, so the product is unchanged. SmoothQuant's s_j = max|X_j|^α / max|W_{:,j}|^(1−α) evens
out the channels' ranges between activations and weights. OS+ first shifts each channel to the middle of its
range, δ_j = (max_j + min_j) / 2 (W·δ moves into the bias), which removes asymmetric outliers, then scales.
"""

from __future__ import annotations

import torch
from torch import nn

from .input_op import InputTransform, add_shift_smooth

_MIN_SCALE = 1e-5


def smoothing_factors(lo: torch.Tensor, hi: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s from the input's per-channel range and the weights of every Linear reading it."""
    act_max = torch.maximum(lo.abs(), hi.abs()).clamp(min=_MIN_SCALE)
    weight_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=_MIN_SCALE)
    s = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    return s.clamp(min=_MIN_SCALE)


@torch.no_grad()
def migrate(ops: list[InputTransform], lo: torch.Tensor, hi: torch.Tensor, alpha: float, shift: bool) -> None:
    """Applies the group's shift (OS+, only where every Linear has a bias to take W·δ) and smoothing."""
    linears: list[nn.Linear] = [op.linear for op in ops]
    delta = None
    if shift and all(linear.bias is not None for linear in linears):
        delta = (hi + lo) / 2
        lo, hi = lo - delta, hi - delta
    s = smoothing_factors(lo, hi, [linear.weight for linear in linears], alpha)
    for op in ops:
        add_shift_smooth(op, delta, s)
