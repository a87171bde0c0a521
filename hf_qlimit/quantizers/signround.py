"""Signed-gradient rounding (the update of AutoRound, Cheng et al. 2023): offsets V in [−½, ½] added before a
straight-through rounding, and per-group factors on the grid's min and max, trained by steps of fixed size in
the direction of the gradient's sign.

Every forward pass uses the hard rounding, so the loss optimised is the one of the final codes, and a few dozen
steps can flip any rounding near its decision (AdaRound's soft variables move far less in so few iterations).
"""

from __future__ import annotations

import torch
from torch import nn

from .fake_quant import qrange

V_BOUND = 0.5  # |V| at most: each weight can move to either neighbour of its start
FACTOR_BOUNDS = (0.5, 1.0)  # the learned min / max stay within [half, all] of the starting range (clipping only)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class SignRoundState(nn.Module):
    """Learnable rounding of one grouped weight on an affine grid (scale, zero) of shape (rows, groups, 1), the
    state reconstruction attaches to a `WeightQuantizer` with `rounding="sign"`.

    `base` is where the rounding starts (the FP weight, or GPTQ's compensated w̃): with V = 0 and factors 1 the
    codes are round(base / s) + z, those of round-to-nearest (of GPTQ). The grid is its own (learned min / max):
    `fake_quant`, `linear` and `final` ignore the quantizer's."""

    learning = True  # every forward pass with autograd on builds the graph of V and the factors

    def __init__(
        self, base: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool, learn_range: bool
    ) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("base", base.detach().float())
        # the grid's range: [−z·s, (qmax − z)·s] reproduces (s, z) exactly at factors 1
        _, qmax = qrange(bits)
        self.register_buffer("low", -zero * scale)
        self.register_buffer("high", (qmax - zero) * scale)
        self.register_buffer("scale0", scale.clone())
        self.register_buffer("zero0", zero.clone())
        self.offset = nn.Parameter(torch.zeros_like(self.base))
        self.low_factor = nn.Parameter(torch.ones_like(scale), requires_grad=learn_range)
        self.high_factor = nn.Parameter(torch.ones_like(scale), requires_grad=learn_range)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) at the current factors; the zero point is an integer (straight-through)."""
        _, qmax = qrange(self.bits)
        if self.symmetric:  # one factor on the half-range, the zero point stays the middle code
            return self.scale0 * self.high_factor, self.zero0
        low, high = self.low * self.low_factor, self.high * self.high_factor
        scale = ((high - low) / qmax).clamp(min=1e-8)
        return scale, _round_ste(-low / scale).clamp(0, qmax)

    def _codes(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        _, qmax = qrange(self.bits)
        return (_round_ste(self.base / scale + self.offset) + zero).clamp(0, qmax)

    def forward(self) -> torch.Tensor:
        """The fake-quantized grouped weight, differentiable in V and the factors."""
        scale, zero = self.grid()
        return (self._codes(scale, zero) - zero) * scale

    def fake_quant(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self()

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        return nn.functional.linear(x, self().reshape(self.base.shape[0], -1).to(x.dtype), bias)

    def parameters_to_learn(self) -> list[nn.Parameter]:
        return [p for p in (self.offset, self.low_factor, self.high_factor) if p.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offset.clamp_(-V_BOUND, V_BOUND)
        self.low_factor.clamp_(*FACTOR_BOUNDS)
        self.high_factor.clamp_(*FACTOR_BOUNDS)

    @torch.no_grad()
    def codes(self, rows: slice) -> torch.Tensor:
        """The codes of `rows`, grouped, as floats."""
        return self._codes(*self.grid())[rows]

    @torch.no_grad()
    def final(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, zero, uint8 codes) as the forward pass uses them, the grid of shape (rows, groups)."""
        scale, zero = self.grid()
        return scale.squeeze(-1), zero.squeeze(-1), self._codes(scale, zero).to(torch.uint8)


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(∂L/∂p), the lr decaying linearly to 0 over `total` steps (AutoRound's schedule)."""

    def __init__(self, params, lr: float, total: int) -> None:
        super().__init__(params, {"lr": lr})
        self.total, self.done = max(1, total), 0

    @torch.no_grad()
    def step(self, closure=None):
        lr_factor = max(0.0, 1.0 - self.done / self.total)
        self.done += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"] * lr_factor)
