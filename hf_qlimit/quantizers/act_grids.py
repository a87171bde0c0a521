"""Activation grids other than LSQ's static per-tensor one: fixed [0, 1] and log2 grids for attention
probabilities and dynamic per-token grids for Linear inputs. All subclass `ActQuantizer`, so calibration and
reconstruction treat them alike; none has a step to learn (their `scale` stays unused and gets no gradient)."""

from __future__ import annotations

import torch

from .lsq import ActQuantizer, mix


def _straight_through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return xq if not torch.is_grad_enabled() or not x.requires_grad else x + (xq - x).detach()


class _Uncalibrated(ActQuantizer):
    """A grid fixed by its definition (log2) or by each input (dynamic): calibration has nothing to set."""

    def observe(self) -> None:
        self._observing = False

    @property
    def has_observed(self) -> bool:
        return True

    def finish_observing(self, p: float) -> None:
        self._observing, self._stats = False, None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        xq = _straight_through(x, self.quantize(x))
        drop = self.drop_prob if self.training else 0.0
        return mix(xq, x, drop) if drop > 0 else xq


class UnitQuantizer(_Uncalibrated):
    """Values in [0, 1] on the uniform levels k / (2^b − 1): step 1/(2^b − 1), zero point 0, fixed by definition.

    For softmax probabilities: no range search, so it cannot clip the probabilities near 1 that a causal model's
    first positions (and attention sinks) carry, which a range fitted to the bulk of small values rounds away."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2**self.bits - 1
        codes = torch.round(x.float().clamp(0, 1) * qmax)
        return (codes / qmax).to(x.dtype)  # k / qmax: 1.0 and 0.0 exactly

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=unit"


class Log2Quantizer(_Uncalibrated):
    """Values in [0, 1] on the levels 2⁰, 2⁻¹, …, 2^-(2^b − 2), and 0 for the last code: softmax probabilities
    keep their relative precision near 0, where most of them lie (a uniform 4-bit grid rounds most to 0)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2**self.bits - 1
        exponent = torch.round(-torch.log2(x.float().clamp(min=0))).clamp(0, qmax)
        return torch.where(exponent >= qmax, 0.0, torch.exp2(-exponent)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=log2"


class DynamicTokenQuantizer(_Uncalibrated):
    """One grid per token (the last dimension), from that token's own min and max at run time: what int8
    serving engines do for Linear inputs. Asymmetric unless `symmetric`."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2**self.bits - 1
        xf = x.float()
        lo, hi = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
        if self.symmetric:
            scale = (2 * torch.maximum(-lo, hi) / qmax).clamp(min=1e-8)
            zero = torch.full_like(scale, float((qmax + 1) // 2))
        else:
            scale = ((hi - lo) / qmax).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(0, qmax)
        codes = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
        return ((codes - zero) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, dynamic=per_token"
