"""Initial quantization ranges: the clipping of [min, max] that minimises the Lp error (p = 2.4 in the papers)."""

from __future__ import annotations

import torch

from .fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range

# Fractions of the observed range tried as the clipping range.
_CANDIDATES = torch.linspace(1.0, 0.2, 81).tolist()


def _lp_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, p: float, dim) -> torch.Tensor:
    err = dequantize_codes(quantize_codes(x, scale, zero, bits), scale, zero) - x
    return err.abs().pow(p).sum(dim=dim)


@torch.no_grad()
def search_weight_range(
    weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, p: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (or per group of `group_size` inputs) scale and zero point, each of shape (out, groups)."""
    w = group_view(weight.detach().float(), group_size)
    xmin, xmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    best_err = torch.full(xmin.shape, float("inf"), device=w.device)
    best_scale, best_zero = torch.ones_like(xmin), torch.zeros_like(xmin)
    for alpha in _CANDIDATES:
        scale, zero = scale_zero_from_range(alpha * xmin, alpha * xmax, bits, symmetric)
        err = _lp_error(w, scale, zero, bits, p, dim=-1).unsqueeze(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale.squeeze(-1), best_zero.squeeze(-1)


@torch.no_grad()
def search_activation_range(
    sample: torch.Tensor, xmin: float, xmax: float, bits: int, symmetric: bool, p: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero point for a whole tensor, from a sample of its values and its observed extremes."""
    lo, hi = torch.tensor(xmin), torch.tensor(xmax)
    sample = sample.float().cpu()
    best = (float("inf"), None, None)
    for alpha in _CANDIDATES:
        scale, zero = scale_zero_from_range(alpha * lo, alpha * hi, bits, symmetric)
        err = _lp_error(sample, scale, zero, bits, p, dim=0).item()
        if err < best[0]:
            best = (err, scale, zero)
    return best[1], best[2]


def group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size); one group per row when `group_size` is None."""
    out_features, in_features = weight.shape
    if group_size is None or group_size >= in_features:
        return weight.reshape(out_features, 1, in_features)
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {in_features} input features of a layer; "
            "choose a divisor, or group_size=None for one scale per output channel."
        )
    return weight.reshape(out_features, in_features // group_size, group_size)
