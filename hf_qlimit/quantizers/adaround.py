"""AdaRound's learnable rounding of one weight on a fixed grid (Nagel et al., 2020), the state that
reconstruction attaches to a `WeightQuantizer` while it learns, and the β and hardening schedules.

w_q = (clamp(c + h(V), qmin, qmax) − z) · s  with  c = ⌊w/s⌋ + z  and  h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1),
regularised by R = Σ (1 − |2h − 1|^β), which pushes every h to 0 or 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .chunks import row_slices
from .fake_quant import dequantize_codes, qrange
from .range_search import group_view

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h can reach exactly 0 and 1
HARD = 100.0  # |V| of a decided rounding: h is exactly 0 or 1 and its gradient 0


def code_dtype(bits: int) -> torch.dtype:
    """Storage of ⌊w/s⌋ + z (clamped to [qmin − 2, qmax + 1]): int8 up to 6 bits, else int16."""
    return torch.int8 if qrange(bits)[1] + 1 <= torch.iinfo(torch.int8).max else torch.int16


def _soft(alpha: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1), in place on a fresh tensor."""
    return torch.sigmoid(alpha).mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)


def _rounding_reg(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β), a row chunk at a time: its temporaries would be weight-sized."""
    return sum((1 - (2 * h[r] - 1).abs_().pow_(beta)).sum() for r in row_slices(h.shape[0], h[0].numel(), True))


def _soft_rounded(alpha, code_floor, zero, scale, qmin: int, qmax: int, beta: float | None):
    """(w_q, R): the soft-rounded weight, grouped like V, and the regulariser (zero without β)."""
    h = _soft(alpha)
    reg = _rounding_reg(h, beta) if beta is not None else alpha.new_zeros(())
    return h.add_(code_floor).clamp_(qmin, qmax).sub_(zero).mul_(scale), reg


def _backward_chunk(g, xf, alpha, code_floor, zero, scale, qmin: int, qmax: int, beta, grad_reg, grad_x, want_scale):
    """For one row chunk (tensors already sliced): adds ∂/∂x of the chunk's outputs to `grad_x` (if given) and
    returns (∂/∂V, ∂/∂s or None) of Σ grad_y · y + grad_reg · R(V). The soft weight and every mask come from one
    sigmoid; masks are 0/1 floats (bool masks cost a cast at every use on CPU)."""
    sig = torch.sigmoid(alpha)
    stretched = sig * (ZETA - GAMMA) + GAMMA
    h = stretched.clamp(0, 1)
    live = torch.eq(h, stretched, out=stretched)  # 1 where the clamp passes the gradient
    inner = h + code_floor
    levels = inner.clamp(qmin, qmax)
    in_range = torch.eq(levels, inner, out=inner)  # clamp passes the gradient on [min, max], ends included
    levels.sub_(zero)  # w_q = levels · s
    grad_w = (g.t() @ xf).reshape(alpha.shape).float()
    grad_scale = (grad_w * levels).sum(-1, keepdim=True) if want_scale else None
    if grad_x is not None:
        grad_x.addmm_(g, levels.mul_(scale).reshape(g.shape[1], -1).to(g.dtype))
    del levels
    grad_h = grad_w.mul_(scale).mul_(in_range)
    if beta is not None:
        u = h.mul_(2).sub_(1)
        grad_h.sub_(u.abs().pow_(beta - 1).copysign_(u).mul_(grad_reg * 2 * beta))
    return grad_h.mul_(live).mul_(torch.addcmul(sig, sig, sig, value=-1)).mul_(ZETA - GAMMA), grad_scale


class SoftRoundedLinear(torch.autograd.Function):
    """F.linear(x, w_q(V), bias) and R(V) in one op, differentiable in V and x.

    With a learned step s (a tensor that requires grad), ∂/∂s comes from the same row chunks.
    Its backward pass rebuilds w_q and forms ∂/∂w_q one row chunk at a time, straight into V's gradient: neither
    the soft weight, its gradient nor autograd's intermediates ever exist whole, which were the peak of a large
    block's reconstruction (several weight-sized tensors per MLP matrix).
    R's value is computed only when `report_reg` (for the progress bar): its gradient does not need it."""

    @staticmethod
    def forward(
        ctx, x, alpha, code_floor, zero, scale, bias, qmin: int, qmax: int, beta: float | None, report_reg: bool
    ):
        w_q, reg = _soft_rounded(alpha, code_floor, zero, scale, qmin, qmax, beta if report_reg else None)
        y = torch.nn.functional.linear(x, w_q.reshape(alpha.shape[0], -1).to(x.dtype), bias)
        ctx.save_for_backward(x, alpha, code_floor, zero, scale)
        ctx.bounds, ctx.beta = (qmin, qmax), beta
        return y, reg

    @staticmethod
    def backward(ctx, grad_y, grad_reg):
        x, alpha, code_floor, zero, scale = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        rows = alpha.shape[0]
        gy, xf = grad_y.reshape(-1, rows), x.reshape(-1, x.shape[-1])
        grad_x = torch.zeros_like(xf) if ctx.needs_input_grad[0] else None
        want_scale = ctx.needs_input_grad[4]
        grad_alpha = torch.empty_like(alpha)
        grad_scale = torch.empty_like(scale) if want_scale else None
        for r in row_slices(rows, alpha[0].numel(), True):
            grad_alpha[r], chunk_scale = _backward_chunk(
                gy[:, r],
                xf,
                alpha[r],
                code_floor[r],
                zero[r],
                scale[r],
                qmin,
                qmax,
                ctx.beta,
                grad_reg,
                grad_x,
                want_scale,
            )
            if want_scale:
                grad_scale[r] = chunk_scale
        grad_bias = gy.sum(0) if ctx.needs_input_grad[5] else None
        grad_x = grad_x.reshape(x.shape) if grad_x is not None else None
        return grad_x, grad_alpha, None, None, grad_scale, grad_bias, None, None, None, None


class AdaRoundState(nn.Module):
    """The rounding variables V (`alpha`) of one weight while reconstruction learns them, and optionally a learned
    dequantization step: s = scale · exp(log_scale), one factor per row and group (the integer codes stay fixed,
    only the step moves, as TesseraQ's DST).

    The reconstruction loop drives it through `set_schedule`, `rounding_loss`, `harden_fraction`, `set_hard` and
    `stop_learning`; the `WeightQuantizer` it is attached to calls `fake_quant`, `linear`, `codes` and `final`
    with its own (scale, zero) of shape (rows, groups).
    """

    def __init__(
        self,
        start: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int | None,
        margin: float | None = None,
    ) -> None:
        """V such that h(V) equals the fractional part of start / s: the soft weight starts at `start` (the FP
        weight, or GPTQ's w̃). With a `margin`, h starts this close to the decision round-to-nearest takes: a
        start whose rounding is already decided (GPTQ's w̃: its error feedback assumes the earlier columns
        rounded) is no good model unrounded."""
        super().__init__()
        self.bits = bits
        qmin, qmax = qrange(bits)
        w = group_view(start.detach().float(), group_size) / scale.unsqueeze(-1)
        floor = w.floor()
        rest = w.sub_(floor).clamp_(1e-4, 1 - 1e-4)
        if margin is not None:  # V >= 0 iff rest >= ½ still holds
            rest = torch.where(rest >= 0.5, 1.0 - margin, margin)
        # c = ⌊w/s⌋ + z as int8 (int16 above 6 bits), fixed while V is learned; clamped to [qmin − 2, qmax + 1],
        # which changes neither clamp(c + h) nor its gradient for h in [0, 1]
        w_floor = floor.add_(zero.unsqueeze(-1).float()).clamp_(qmin - 2, qmax + 1).to(code_dtype(bits))
        self.register_buffer("w_floor", w_floor, persistent=False)
        del floor
        self.alpha = nn.Parameter(rest.sub_(GAMMA).reciprocal_().mul_(ZETA - GAMMA).sub_(1).log_().neg_())
        self.register_parameter("log_scale", None)
        self._step_like = scale.shape, scale.dtype
        self._hard = False  # evaluate with the hard rounding (V >= 0) while V is still soft
        self._beta: float | None = None  # None: no regulariser
        self._report = True  # False: the regulariser's value is not computed (its gradient still is)
        self._reg: torch.Tensor | None = None  # R from this iteration's forward pass

    @property
    def learning(self) -> bool:
        return self.alpha.requires_grad

    def learn_scale(self) -> nn.Parameter:
        """Starts learning the dequantization step (one log-factor per row and group); returns the parameter."""
        shape, dtype = self._step_like
        self.log_scale = nn.Parameter(torch.zeros(shape, dtype=dtype, device=self.alpha.device))
        return self.log_scale

    def set_schedule(self, beta: float | None, report: bool = True) -> None:
        """β of the regulariser for the coming forward passes (None: no regulariser); `report`: compute its value
        too, which only the progress bar shows."""
        self._beta, self._report = beta, report

    def set_hard(self, hard: bool) -> None:
        """Evaluate with the hard rounding (V >= 0) while V is still soft, or go back to the soft one."""
        self._hard = hard

    def stop_learning(self) -> None:
        """V gets no gradient any more (every h is decided)."""
        self.alpha.requires_grad_(False)

    def grid(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) of shape (rows, groups, 1) from the quantizer's (scale, zero), with the learned step."""
        if self.log_scale is not None:
            scale = scale * torch.exp(self.log_scale)
        return scale.unsqueeze(-1), zero.unsqueeze(-1).float()

    def soft_rounding(self) -> torch.Tensor:
        if self._hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding_loss(self) -> torch.Tensor:
        """Σ (1 - |2h - 1|^β) at the scheduled β, from this iteration's forward pass: pushes every h to 0 or 1."""
        if self._reg is None:  # the module did not run this iteration: the regulariser still applies
            return (1 - (2 * self.soft_rounding() - 1).abs().pow(self._beta)).sum()
        reg, self._reg = self._reg, None
        return reg

    @torch.no_grad()
    def undecided(self, low: float = 0.01, high: float = 0.99) -> tuple[int, int]:
        """(number of h strictly between `low` and `high`, number of h): how far the rounding is from hard."""
        count = 0
        for r in row_slices(self.alpha.shape[0], self.alpha[0].numel(), True):
            h = _soft(self.alpha[r])
            count += int(((h > low) & (h < high)).sum())
        return count, self.alpha.numel()

    @torch.no_grad()
    def harden_fraction(self, fraction: float) -> None:
        """Progressive hardening: the `fraction` of rounding variables with h farthest from ½ (largest |V|),
        those already hard included, are set hard for good."""
        if fraction <= 0:
            return
        magnitude = self.alpha.abs().reshape(-1)
        n = magnitude.numel()
        keep_soft = n - min(n, math.ceil(fraction * n))
        threshold = float(torch.kthvalue(magnitude, keep_soft).values) if keep_soft > 0 else -1.0
        chosen = (magnitude > threshold).reshape(self.alpha.shape)
        self.alpha.data = torch.where(chosen, torch.where(self.alpha >= 0, HARD, -HARD), self.alpha)

    def fake_quant(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The soft-rounded weight, grouped, differentiable by autograd (a learning Linear uses `linear`)."""
        s, z = self.grid(scale, zero)
        qmin, qmax = qrange(self.bits)
        q = torch.clamp(self.soft_rounding() + self.w_floor, qmin, qmax)
        return dequantize_codes(q, s, z)

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        """F.linear with the soft-rounded weight, the regulariser alongside (see SoftRoundedLinear)."""
        s, z = self.grid(scale, zero)
        qmin, qmax = qrange(self.bits)
        y, reg = SoftRoundedLinear.apply(x, self.alpha, self.w_floor, z, s, bias, qmin, qmax, self._beta, self._report)
        self._reg = reg if self._beta is not None else None
        return y

    def codes(self, rows: slice) -> torch.Tensor:
        """The hard-rounded codes of `rows`, grouped, as floats."""
        qmin, qmax = qrange(self.bits)
        return torch.clamp(self.w_floor[rows] + (self.alpha[rows] >= 0).float(), qmin, qmax)

    @torch.no_grad()
    def final(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, zero, uint8 codes) of the hard rounding, the learned step in the scale as the very floats the
        forward pass used (so the frozen and the saved model compute what was evaluated)."""
        self._reg = None  # drops the last graph
        codes = torch.empty(self.alpha.shape, dtype=torch.uint8, device=self.alpha.device)
        for r in row_slices(self.alpha.shape[0], self.alpha[0].numel(), True):
            codes[r] = self.codes(r)
        if self.log_scale is not None:
            scale = scale * torch.exp(self.log_scale)
        return scale, zero, codes


def hardened_fraction(step: int, total: int, warmup: float, end: float = 0.8) -> float:
    """Progressive hardening: the fraction of rounding variables hard at `step`, rising from 0 after warm-up
    to 1 at `end` of the iterations (the rest trains the steps on the hard block, where soft = hard loss)."""
    warm, stop = int(warmup * total), max(int(warmup * total) + 1, int(end * total))
    return min(1.0, max(0.0, (step - warm + 1) / (stop - warm)))


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β of the rounding regulariser at `step`, or None during warm-up (no regulariser)."""
    warm = int(warmup * total)
    if step < warm:
        return None
    progress = (step - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)
