"""Activation quantizer: one learned step size per tensor (LSQ), with QDrop's random dropping."""

from __future__ import annotations

import math

import torch
from torch import nn

from .range_search import search_activation_range

_SAMPLE_PER_CALL = 4096
_SAMPLE_MAX = 1 << 17


def mix(quantized: torch.Tensor, fp: torch.Tensor, p: float) -> torch.Tensor:
    """Each element from `fp` with probability p, else from `quantized` (QDrop).

    lerp with a 0/1 float mask: several times faster than torch.where on CPU, same gradients.
    """
    return torch.lerp(quantized, fp, torch.rand_like(fp).lt_(p))


class _LearnedStepQuant(torch.autograd.Function):
    """LSQ fake quantization with QDrop's dropping in one op: out = x where dropped, else (clamp(⌊x/s⌉+z) − z)·s.

    Gradients: x passes where dropped or inside the grid (straight-through); s gets LSQ's ⌊x/s⌉ − x/s inside,
    qmin − z or qmax − z where clipped, nothing where dropped (grad_factor 1, as torch's learnable kernel).
    The forward pass prepares both as one bool and one float per element, so the backward pass is two passes.
    The unfused chain (torch's learnable kernel, a float mask, lerp) kept more activation-sized tensors for the
    backward pass and ran longer.
    """

    @staticmethod
    def forward(ctx, x, scale, zero, qmax: int, drop_prob: float):
        scale = scale.detach().reshape(1)  # tensor arguments: no host sync on a GPU
        enabled = torch.ones(1, dtype=torch.long, device=x.device)
        out, passes = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale, zero.round().int().reshape(1), enabled, 0, qmax
        )
        inv = 1.0 / scale
        # out / s is ⌊x/s⌉ inside and qmin − z or qmax − z where clipped: the step's gradient coefficient
        coef = (out - x * passes).mul_(inv)
        if drop_prob > 0:
            # float 0/1 masks and lerp/mul: torch.where and masked_fill are ~10x slower on CPU
            quantized = torch.rand_like(x, dtype=torch.float32).ge_(drop_prob).to(x.dtype)
            out = torch.lerp(x, out, quantized)  # exactly x or out at weights 0 and 1
            coef.mul_(quantized)
            passes.logical_or_(quantized == 0)
        ctx.save_for_backward(passes, coef)
        return out

    @staticmethod
    def backward(ctx, grad):
        passes, coef = ctx.saved_tensors
        grad_scale = torch.dot(grad.reshape(-1).float(), coef.reshape(-1).float())
        return grad * passes, grad_scale, None, None, None


class ActQuantizer(nn.Module):
    """Fake-quantizes a tensor on a per-tensor grid whose step size is trained (LSQ); the zero point stays fixed.

    Lifecycle: `observe()` -> forwards record extremes and a value sample -> `finish_observing()` sets the grid
    by Lp search. During reconstruction `drop_prob` > 0 keeps each element in FP with that probability (QDrop).
    """

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero", torch.tensor(0.0))
        self.enabled = True
        self.drop_prob = 0.0
        self._observing = False
        self._stats: dict | None = None

    def observe(self) -> None:
        self._observing = True
        self._stats = {"min": math.inf, "max": -math.inf, "samples": [], "count": 0}

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(
                "NaN or Inf activations reached an activation quantizer during calibration. Check the model in full "
                "precision on the calibration data first (a half-precision overflow is the usual cause; load in float32)."
            )
        stats = self._stats
        flat = x.detach().reshape(-1).float()
        stats["min"] = min(stats["min"], flat.min().item())
        stats["max"] = max(stats["max"], flat.max().item())
        if stats["count"] < _SAMPLE_MAX:
            idx = torch.randint(0, flat.numel(), (min(_SAMPLE_PER_CALL, flat.numel()),), device=flat.device)
            stats["samples"].append(flat[idx].cpu())
            stats["count"] += idx.numel()

    @property
    def has_observed(self) -> bool:
        return bool(self._stats and self._stats["samples"])

    def stop_observing(self) -> None:
        """Ends an observation without touching the grid (for a quantizer that saw no data yet)."""
        self._observing, self._stats = False, None

    @torch.no_grad()
    def finish_observing(self, p: float) -> None:
        if self._stats is None or not self._stats["samples"]:
            raise RuntimeError("An activation quantizer saw no data during calibration; the module was never called.")
        stats, self._stats, self._observing = self._stats, None, False
        sample = torch.cat(stats["samples"])
        scale, zero = search_activation_range(sample, stats["min"], stats["max"], self.bits, self.symmetric, p)
        self.scale.data.fill_(scale.item())
        self.zero.fill_(zero.item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._record(x)
            return x
        if not self.enabled:
            return x
        qmax = 2**self.bits - 1
        drop = self.drop_prob if self.training else 0.0
        if self.scale.requires_grad and torch.is_grad_enabled():
            return _LearnedStepQuant.apply(x, self.scale, self.zero, qmax, drop)
        xq = torch.fake_quantize_per_tensor_affine(x, self.scale.detach(), self.zero.round().int(), 0, qmax)
        return mix(xq, x, drop) if drop > 0 else xq

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"
