"""Initial quantization ranges: the clipping of [min, max] that minimises the Lp error (p = 2.4 in the papers)."""

from __future__ import annotations

import torch

from .fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range

# Fractions of the observed range tried as the clipping range: a coarse grid, then a finer one around the best.
_COARSE = torch.linspace(1.0, 0.2, 17).tolist()
_FINE_STEP = 0.05 / 4
SEARCH_CHUNK = 1 << 18  # weights are searched in chunks of rows that stay in the CPU cache across candidates


def _lp_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, p: float, dim, err_weight=None):
    err = (dequantize_codes(quantize_codes(x, scale, zero, bits), scale, zero) - x).abs().pow(p)
    return (err if err_weight is None else err * err_weight).sum(dim=dim)


def _search_rows(w: torch.Tensor, bits: int, symmetric: bool, p: float, xmin=None, xmax=None, err_weight=None):
    """Best (scale, zero) for each row of `w` (the last dim holds the values), clipping [xmin, xmax].
    `err_weight` (broadcast to `w`) weights each value's error, e.g. by the diagonal of its input Hessian."""
    if xmin is None:
        xmin, xmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)

    def best_of(alphas: list[torch.Tensor]) -> torch.Tensor:
        best_err = torch.full_like(xmin, float("inf"))
        best_alpha = torch.ones_like(xmin)
        for alpha in alphas:
            scale, zero = scale_zero_from_range(alpha * xmin, alpha * xmax, bits, symmetric)
            err = _lp_error(w, scale, zero, bits, p, dim=-1, err_weight=err_weight).unsqueeze(-1)
            better = err < best_err
            best_err, best_alpha = torch.where(better, err, best_err), torch.where(better, alpha, best_alpha)
        return best_alpha

    coarse = best_of([torch.full_like(xmin, a) for a in _COARSE])
    fine = best_of([(coarse + k * _FINE_STEP).clamp(0.05, 1.0) for k in range(-3, 4)])
    return scale_zero_from_range(fine * xmin, fine * xmax, bits, symmetric)


def search_grouped_rows(
    w: torch.Tensor, bits: int, symmetric: bool, p: float, err_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of shape (out, groups) for a grouped weight (out, groups, group_size), a chunk of rows at a
    time; `err_weight` (broadcast to a chunk) weights each value's error."""
    rows = max(1, SEARCH_CHUNK // (w.shape[1] * w.shape[2]))
    parts = [
        _search_rows(w[i : i + rows], bits, symmetric, p, err_weight=err_weight) for i in range(0, w.shape[0], rows)
    ]
    scale = torch.cat([s for s, _ in parts]).squeeze(-1)
    zero = torch.cat([z for _, z in parts]).squeeze(-1)
    return scale, zero


@torch.no_grad()
def search_weight_range(
    weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, p: float | None = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (or per group of `group_size` inputs) scale and zero point, each of shape (out, groups);
    `p=None`: no search, the full [min, max]."""
    w = group_view(weight.detach().float(), group_size)
    if p is None:
        return scale_zero_from_range(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric)
    return search_grouped_rows(w, bits, symmetric, p)


@torch.no_grad()
def search_activation_range(
    sample: torch.Tensor, xmin: float, xmax: float, bits: int, symmetric: bool, p: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero point for a whole tensor, from a sample of its values and its observed extremes."""
    row = sample.float().cpu().reshape(1, -1)
    scale, zero = _search_rows(row, bits, symmetric, p, torch.tensor([[xmin]]), torch.tensor([[xmax]]))
    return scale.reshape(()), zero.reshape(())


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
