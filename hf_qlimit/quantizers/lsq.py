"""Activation quantizer: one learned step size per tensor (LSQ), with QDrop's random dropping."""

from __future__ import annotations

import math

import torch
from torch import nn

from .range_search import search_activation_range

_SAMPLE_PER_CALL = 4096
_SAMPLE_MAX = 1 << 17


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 tensor shaped and typed like `like`, 0 with probability p (p rounded to a multiple of 2⁻¹⁶).

    Sixteen random bits per element, drawn 64 at a time, compared straight into the float result: torch's
    per-element generator (rand_like) and bool tensors (a compare, then a cast) each cost more than all of a fake
    quantization's arithmetic on CPU.
    """
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    threshold = round(p * 65536) - 32768  # P(bits16 >= threshold) = 1 - p
    out = torch.empty(n, dtype=like.dtype, device=like.device)
    return torch.ge(bits.view(torch.int16)[:n], threshold, out=out).view(like.shape)


def mix(quantized: torch.Tensor, fp: torch.Tensor, p: float) -> torch.Tensor:
    """Each element from `fp` with probability p, else from `quantized` (QDrop)."""
    return torch.lerp(fp, quantized, keep_mask(fp, p))


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int):
    """(clamp(⌊x·(1/s)⌉ + z, 0, qmax), ⌊x·(1/s)⌉ + z, x·(1/s)): torch's fake-quant arithmetic in plain ops, which
    give the same floats and run several times faster on CPU than its fused kernel (clamp with scalar bounds:
    tensor bounds cost as much as the rest)."""
    scaled = x * (1.0 / scale)
    shifted = torch.round(scaled).add_(zero)
    return shifted.clamp(0, qmax), shifted, scaled


class LearnedStepQuant(torch.autograd.Function):
    """LSQ fake quantization with QDrop's dropping in one op: out = x where dropped, else (clamp(⌊x/s⌉+z) − z)·s.

    Gradients: x passes where dropped or inside the grid (straight-through); s gets LSQ's ⌊x/s⌉ − x/s inside,
    qmin − z or qmax − z where clipped, nothing where dropped (grad_factor 1, as torch's learnable kernel).
    The forward pass prepares both (one byte and one float per element), so the backward pass is two passes.
    Masks are floats while computed and stored as bytes: on CPU, bool -> float and float -> uint8 casts are slow,
    float -> bool and uint8 -> float are not.
    """

    @staticmethod
    def forward(ctx, x, scale, zero, qmax: int, drop_prob: float):
        scale = scale.detach().reshape(1).to(x.dtype)  # tensor arguments: no host sync on a GPU
        zero = zero.round().reshape(1).to(x.dtype)
        levels, shifted, scaled = _fake_quant(x, scale, zero, qmax)
        inside = torch.eq(shifted, levels, out=shifted)  # 1.0 where not clipped
        levels.sub_(zero)
        coef = torch.addcmul(levels, scaled, inside, value=-1)  # ⌊x/s⌉ − x/s inside, the clipped level outside
        out = levels.mul_(scale)
        if drop_prob > 0:
            quantized = keep_mask(x, drop_prob)
            out = torch.lerp(x, out, quantized)  # exactly x or out at weights 0 and 1
            coef.mul_(quantized)
            inside.sub_(1).mul_(quantized).add_(1)  # 0 only where quantized and clipped
        ctx.save_for_backward(inside.to(torch.bool).view(torch.uint8), coef)
        return out

    @staticmethod
    def backward(ctx, grad):
        passes, coef = ctx.saved_tensors
        grad_scale = torch.dot(grad.reshape(-1).float(), coef.reshape(-1).float())
        return grad * passes.to(grad.dtype), grad_scale, None, None, None


class ActQuantizer(nn.Module):
    """Fake-quantizes a tensor on a per-tensor grid whose step size is trained (LSQ); the zero point stays fixed.

    Lifecycle: `observe()` -> forwards record extremes and a value sample -> `finish_observing()` sets the grid
    by Lp search. Reconstruction: `begin_reconstruction(drop_prob)` -> steps of the returned `scale`, each followed
    by `clamp_step()` -> `end_reconstruction()`; meanwhile `drop_prob` > 0 keeps each element in FP with that
    probability (QDrop).
    """

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero", torch.tensor(0.0))
        self._enabled = True
        self.drop_prob = 0.0  # set by `begin_reconstruction`
        self._observing = False
        self._stats: dict | None = None

    @property
    def enabled(self) -> bool:
        """False: `forward` returns its input as it is (see `calibration.quant_state`)."""
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled

    def begin_reconstruction(self, drop_prob: float) -> nn.Parameter:
        """Training mode (QDrop's dropping at `drop_prob`); returns the step size, now learnable."""
        self.scale.requires_grad_(True)
        self.drop_prob = drop_prob
        self.train()
        return self.scale

    @torch.no_grad()
    def clamp_step(self) -> None:
        """Keeps the step size positive after an optimizer step."""
        self.scale.data.clamp_(min=1e-8)

    def end_reconstruction(self) -> None:
        self.drop_prob = 0.0
        self.eval()
        self.scale.requires_grad_(False)
        self.scale.grad = None

    @property
    def observing(self) -> bool:
        """Between `observe()` and `finish_observing()` / `stop_observing()`: forwards record their input and
        return it unquantized."""
        return self._observing

    def observe(self) -> None:
        self._observing = True
        self._stats = {"min": math.inf, "max": -math.inf, "samples": [], "count": 0}

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(
                "NaN or Inf activations reached an activation quantizer during calibration. Check the model in full "
                "precision on the calibration data first (a half-precision overflow is the usual cause; load in "
                "float32)."
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
        if not self._enabled:
            return x
        qmax = 2**self.bits - 1
        drop = self.drop_prob if self.training else 0.0
        if self.scale.requires_grad and torch.is_grad_enabled():
            return LearnedStepQuant.apply(x, self.scale, self.zero, qmax, drop)
        scale, zero = self.scale.detach().to(x.dtype), self.zero.round().to(x.dtype)
        xq = _fake_quant(x, scale, zero, qmax)[0].sub_(zero).mul_(scale)
        return mix(xq, x, drop) if drop > 0 else xq

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # a quantizer shared by sibling Linears (act_layout="shared") is saved once per Linear,
            for name in ("scale", "zero"):  # each key its own storage: no shared tensors for the saver to drop
                destination[prefix + name] = destination[prefix + name].clone()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"
