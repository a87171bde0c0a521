"""Folding per-channel factors into the norm in front of the Linears (pre-LN models: OPT, Llama, Gemma...).

When a norm's output feeds only the readers of one group, (norm(x) − δ) / s is a norm with γ' = γ / s and
β' = (β − δ) / s: the op disappears and the checkpoint is an ordinary model with changed norm and Linear weights.
Gemma's RMSNorm multiplies by (1 + w), so there w' = (1 + w) / s − 1. Which form a norm has is read from the
norm itself (its output with w = 0), and the folded norm is checked on a probe input, so a norm of another form
is refused rather than folded wrongly.
"""

from __future__ import annotations

import torch
from torch import nn

_PROBE_TOKENS = 4


def can_fold(norm: nn.Module | None) -> bool:
    """Whether `norm` has a per-channel weight to absorb factors (ModernBERT's first `attn_norm` is an Identity)."""
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1


@torch.no_grad()
def _weight_offset(norm: nn.Module, probe: torch.Tensor) -> float:
    """1.0 for a norm computing x̂·(1 + w) (Gemma), 0.0 for x̂·w: its output with w = 0 (and β = 0) is x̂ or 0."""
    weight, bias = norm.weight, getattr(norm, "bias", None)
    saved = weight.clone(), (bias.clone() if bias is not None else None)
    weight.zero_()
    if bias is not None:
        bias.zero_()
    try:
        return 0.0 if bool((norm(probe) == 0).all()) else 1.0
    finally:
        weight.copy_(saved[0])
        if bias is not None:
            bias.copy_(saved[1])


@torch.no_grad()
def fold_into_norm(norm: nn.Module, shift: torch.Tensor | None, smooth: torch.Tensor | None) -> None:
    """norm -> (norm − shift) / smooth, in `norm`'s weight and bias; refuses a norm it cannot fold exactly."""
    if shift is None and smooth is None:
        return
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not can_fold(norm):
        raise ValueError(f"Cannot fold a channel scale into {type(norm).__name__}: it has no per-channel weight.")
    if shift is not None and bias is None:
        raise ValueError(f"Cannot fold a channel shift into {type(norm).__name__}: it has no bias (RMSNorm).")
    generator = torch.Generator().manual_seed(0)  # the global RNG stays as it was
    probe = torch.randn(_PROBE_TOKENS, weight.shape[0], generator=generator).to(weight.device, weight.dtype)
    offset = _weight_offset(norm, probe)
    expected = norm(probe).float()
    s = smooth if smooth is not None else torch.ones_like(weight)
    if shift is not None:
        expected = expected - shift.float()
    expected = expected / s.float()
    saved = weight.clone(), (bias.clone() if bias is not None else None)
    if bias is not None:
        bias.copy_((bias - (shift if shift is not None else 0.0)) / s)
    if offset:
        weight.copy_((weight + offset) / s - offset)
    else:
        weight.div_(s)
    _check_folded(norm, probe, expected, saved)


def _check_folded(norm: nn.Module, probe: torch.Tensor, expected: torch.Tensor, saved: tuple) -> None:
    got = norm(probe).float()
    tolerance = 1e-4 if norm.weight.dtype == torch.float32 else 2e-2
    error = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
    if error > tolerance:
        norm.weight.copy_(saved[0])
        if saved[1] is not None:
            norm.bias.copy_(saved[1])
        raise ValueError(
            f"Folding channel factors into {type(norm).__name__} did not give the expected output (relative error "
            f"{error:.2g}): it computes neither x̂·w (+ b) nor x̂·(1 + w) (+ b), so its weight cannot absorb them."
        )
