"""Weight quantizer: per-channel (or per-group) affine grid, rounded to nearest or by AdaRound."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .fake_quant import dequantize_codes, qrange, quantize_codes
from .range_search import group_view, search_weight_range

ROW_CHUNK = 1 << 22  # weight elements handled at a time when a whole matrix need not be in float at once
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h can reach exactly 0 and 1


def row_slices(rows: int, cols: int) -> Iterator[slice]:
    """Consecutive row ranges of a (rows, cols) matrix, each of about ROW_CHUNK elements (at least one row)."""
    step = max(1, ROW_CHUNK // cols)
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))


class _SoftRounded(torch.autograd.Function):
    """AdaRound's soft-rounded weight and its rounding regulariser in one op, differentiable in V.

    w_q = (clamp(⌊w/s⌋ + h(V) + z, qmin, qmax) − z) · s  and  R = Σ (1 − |2h − 1|^β),  h = clamp(σ(V)(ζ−γ)+γ, 0, 1).
    Autograd would keep four weight-sized intermediates per Linear for the backward pass; this keeps none (it
    recomputes σ(V) there), which is most of a large block's reconstruction memory.
    """

    @staticmethod
    def forward(ctx, alpha, w_floor, zero, scale, qmin: int, qmax: int, beta: float | None):
        h = torch.sigmoid(alpha).mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        reg = (1 - (2 * h - 1).abs().pow(beta)).sum() if beta is not None else alpha.new_zeros(())
        out = h.add_(w_floor).add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        ctx.save_for_backward(alpha, w_floor, zero)
        ctx.scale, ctx.bounds, ctx.beta = scale, (qmin, qmax), beta
        return out, reg

    @staticmethod
    def backward(ctx, grad_out, grad_reg):
        alpha, w_floor, zero = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        sig = torch.sigmoid(alpha)
        stretched = sig * (ZETA - GAMMA) + GAMMA
        h = stretched.clamp(0, 1)
        inner = w_floor + h + zero
        # clamp passes the gradient on [min, max], both ends included, as torch.clamp does
        grad_h = grad_out * ctx.scale * ((inner >= qmin) & (inner <= qmax))
        if ctx.beta is not None:
            u = 2 * h - 1
            grad_h = grad_h - grad_reg * 2 * ctx.beta * u.abs().pow(ctx.beta - 1) * u.sign()
        grad_alpha = grad_h * ((stretched >= 0) & (stretched <= 1)) * (ZETA - GAMMA) * sig * (1 - sig)
        return grad_alpha, None, None, None, None, None, None


class WeightQuantizer(nn.Module):
    """Holds the grid (scale, zero point) of one weight and, during reconstruction, AdaRound's variables V.

    The weight itself stays in the owning module; `forward(weight)` returns its fake-quantized copy.
    """

    def __init__(self, bits: int, shape: tuple[int, int], group_size: int | None, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size is None or group_size >= shape[1] else shape[1] // group_size
        self.register_buffer("scale", torch.ones(shape[0], groups))
        self.register_buffer("zero", torch.zeros(shape[0], groups, dtype=torch.uint8))
        self.alpha: nn.Parameter | None = None  # AdaRound's V, same shape as the grouped weight
        self.register_buffer("w_floor", None, persistent=False)  # floor(w / s): fixed while V is learned
        self.beta: float | None = None  # set by the reconstruction loop before each forward; None: no regulariser
        self._reg: torch.Tensor | None = None
        self.enabled = True

    def _grid(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = (self.scale, self.zero) if rows is None else (self.scale[rows], self.zero[rows])
        return scale.unsqueeze(-1), zero.unsqueeze(-1).float()

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor, p: float) -> None:
        scale, zero = search_weight_range(weight, self.bits, self.symmetric, self.group_size, p)
        self.scale.copy_(scale)
        self.zero.copy_(zero.to(torch.uint8))

    @torch.no_grad()
    def init_adaround(self, weight: torch.Tensor) -> None:
        """V such that h(V) equals the fractional part of w / s, i.e. the soft weight starts at the FP weight."""
        scale, _ = self._grid()
        w = group_view(weight.detach().float(), self.group_size) / scale
        self.w_floor = w.floor()
        rest = (w - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    @torch.no_grad()
    def harden(self) -> None:
        """Saturates V so the soft rounding equals the hard one (h in {0, 1}) exactly."""
        if self.alpha is not None:
            self.alpha.data = torch.where(self.alpha >= 0, 100.0, -100.0).to(self.alpha.dtype)
            self.alpha.requires_grad_(False)

    def rounding_loss(self) -> torch.Tensor:
        """Σ (1 - |2h - 1|^β) at `self.beta`, from this iteration's forward pass: pushes every h to 0 or 1."""
        if self._reg is None:  # the module did not run this iteration: the regulariser still applies
            return (1 - (2 * self.soft_rounding() - 1).abs().pow(self.beta)).sum()
        reg, self._reg = self._reg, None
        return reg

    def forward(self, weight: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight; with `rows`, `weight` holds only those rows (an embedding lookup)."""
        if not self.enabled:
            return weight
        scale, zero = self._grid(rows)
        w = group_view(weight, self.group_size)
        if self.alpha is None:
            q = quantize_codes(w, scale, zero, self.bits)
        else:
            qmin, qmax = qrange(self.bits)
            if self.alpha.requires_grad and torch.is_grad_enabled():
                out, reg = _SoftRounded.apply(self.alpha, self.w_floor, zero, scale, qmin, qmax, self.beta)
                self._reg = reg if self.beta is not None else None
                return out.reshape(weight.shape)
            h = self.soft_rounding()  # exactly 0 or 1 once `harden()` has run
            q = torch.clamp(self.w_floor + h + zero, qmin, qmax)
        return dequantize_codes(q, scale, zero).reshape(weight.shape)

    @torch.no_grad()
    def code_chunks(self, weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, their uint8 codes) of the final (hard-rounded) weight, a row chunk at a time: the float
        temporaries of a whole LM head would be GBs."""
        for rows in row_slices(*weight.shape):
            yield rows, self._codes(weight, rows)

    def _codes(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        scale, zero = self._grid(rows)
        w = group_view(weight[rows].detach().float(), self.group_size)
        if self.alpha is None:
            q = quantize_codes(w, scale, zero, self.bits)
        else:
            qmin, qmax = qrange(self.bits)
            q = torch.clamp(self.w_floor[rows] + (self.alpha[rows] >= 0).float() + zero, qmin, qmax)
        return q.reshape(-1, weight.shape[1]).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float weight of integer codes (of all rows, or of `rows` only)."""
        scale, zero = self._grid(rows)
        q = group_view(codes.float(), self.group_size)
        return q.sub_(zero).mul_(scale).reshape(codes.shape)  # in place: codes.float() is already a copy

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β of the rounding regulariser at `step`, or None during warm-up (no regulariser)."""
    warm = int(warmup * total)
    if step < warm:
        return None
    progress = (step - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)
