"""Uniform affine grids: codes q in [0, 2^b - 1], x ≈ (q - z) · s.

These helpers serve weights and range search. Activations have their own copy of torch's fake-quant arithmetic
in plain ops (lsq.py), deliberately not torch's fused kernels: the same floats, several times faster on CPU.
"""

from __future__ import annotations

import torch


def qrange(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def scale_zero_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point whose grid covers [xmin, xmax] (which is widened to contain 0)."""
    qmin, qmax = qrange(bits)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        # Codes are unsigned; the symmetric grid is centred on the middle code.
        scale = (2 * absmax / (qmax - qmin)).clamp(min=1e-8)
        zero = torch.full_like(scale, float((qmax + 1) // 2))
    else:
        scale = ((xmax - xmin) / (qmax - qmin)).clamp(min=1e-8)
        zero = (qmin - xmin / scale).round().clamp(qmin, qmax)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale
