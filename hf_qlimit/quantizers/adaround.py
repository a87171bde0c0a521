"""Weight quantizer: per-channel (or per-group) affine grid, rounded to nearest or by AdaRound."""

from __future__ import annotations

import torch
from torch import nn

from .fake_quant import dequantize_codes, qrange, quantize_codes
from .range_search import group_view, search_weight_range

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h can reach exactly 0 and 1


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
        self._h: torch.Tensor | None = None
        self.enabled = True

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.unsqueeze(-1), self.zero.unsqueeze(-1).float()

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

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """Σ (1 - |2h - 1|^β): pushes every h to 0 or 1."""
        # Reuse the h of this iteration's forward pass (same graph) instead of computing it twice.
        h, self._h = (self._h, None) if self._h is not None else (self.soft_rounding(), None)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero = self._grid()
        w = group_view(weight, self.group_size)
        if self.alpha is None:
            q = quantize_codes(w, scale, zero, self.bits)
        else:
            h = self.soft_rounding()  # exactly 0 or 1 once `harden()` has run
            self._h = h if h.requires_grad else None
            qmin, qmax = qrange(self.bits)
            q = torch.clamp(self.w_floor + h + zero, qmin, qmax)
        return dequantize_codes(q, scale, zero).reshape(weight.shape)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of the final (hard-rounded) weight, as uint8 of the weight's shape."""
        scale, zero = self._grid()
        w = group_view(weight.detach().float(), self.group_size)
        if self.alpha is None:
            q = quantize_codes(w, scale, zero, self.bits)
        else:
            qmin, qmax = qrange(self.bits)
            q = torch.clamp(self.w_floor + (self.alpha >= 0).float() + zero, qmin, qmax)
        return q.reshape(weight.shape).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self._grid()
        q = group_view(codes.float(), self.group_size)
        return dequantize_codes(q, scale, zero).reshape(codes.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β of the rounding regulariser at `step`, or None during warm-up (no regulariser)."""
    warm = int(warmup * total)
    if step < warm:
        return None
    progress = (step - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)
