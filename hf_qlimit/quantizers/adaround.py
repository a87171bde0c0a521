"""Weight quantizer: per-channel (or per-group) affine grid, rounded to nearest or by AdaRound."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .fake_quant import dequantize_codes, qrange, quantize_codes
from .range_search import group_view, search_weight_range
from .signround import SignRounding

ROW_CHUNK = 1 << 22  # weight elements handled at a time when a whole matrix need not be in float at once
# ... and in the elementwise loops of every reconstruction iteration, whose temporaries add to its peak
TEMP_CHUNK = 1 << 20
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h can reach exactly 0 and 1


def row_slices(rows: int, cols: int, temporaries: bool = False) -> Iterator[slice]:
    """Consecutive row ranges of a (rows, cols) matrix, each of about ROW_CHUNK (TEMP_CHUNK) elements, at
    least one row."""
    step = max(1, (TEMP_CHUNK if temporaries else ROW_CHUNK) // cols)
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))


def _code_dtype(bits: int) -> torch.dtype:
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


class _SoftRoundedLinear(torch.autograd.Function):
    """F.linear(x, w_q(V), bias) and R(V) in one op, differentiable in V and x.

    w_q = (clamp(c + h(V), qmin, qmax) − z) · s  and  R = Σ (1 − |2h − 1|^β),  c = ⌊w/s⌋ + z.
    With a learned step s (a tensor that requires grad), ∂/∂s comes from the same row chunks.
    Its backward pass rebuilds w_q and forms ∂/∂w_q one row chunk at a time, straight into V's gradient: neither
    the soft weight, its gradient nor autograd's intermediates ever exist whole, which were the peak of a large
    block's reconstruction (several weight-sized tensors per MLP matrix).
    R's value is computed only when `report_reg` (for the progress bar): its gradient does not need it."""

    @staticmethod
    def forward(ctx, x, alpha, code_floor, zero, scale, bias, qmin: int, qmax: int, beta: float | None, report_reg: bool):
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
                gy[:, r], xf, alpha[r], code_floor[r], zero[r], scale[r], qmin, qmax, ctx.beta, grad_reg, grad_x,
                want_scale,
            )  # fmt: skip
            if want_scale:
                grad_scale[r] = chunk_scale
        grad_bias = gy.sum(0) if ctx.needs_input_grad[5] else None
        grad_x = grad_x.reshape(x.shape) if grad_x is not None else None
        return grad_x, grad_alpha, None, None, grad_scale, grad_bias, None, None, None, None


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
        # While learning the grid: s = scale · exp(log_scale), one factor per row and group (the integer codes
        # stay fixed, only the dequantization step moves, as TesseraQ's DST). Baked into `scale` at the end.
        self.log_scale: nn.Parameter | None = None
        self.hard = False  # evaluate with the hard rounding (V >= 0) while V is still soft
        self.start: torch.Tensor | None = None  # the weight the rounding starts from, if not the FP one (GPTQ's w̃)
        # With a start weight whose rounding is already decided (GPTQ's w̃: unrounded it is no good model, its error
        # feedback assumes the earlier columns rounded), h starts this close to the decision instead of at frac(w/s)
        self.start_margin: float | None = None
        # ⌊w/s⌋ + z as int8 (int16 above 6 bits), fixed while V is learned; clamped to [qmin − 2, qmax + 1],
        # which changes neither clamp(c + h) nor its gradient for h in [0, 1]
        self.register_buffer("w_floor", None, persistent=False)
        self.beta: float | None = None  # set by the reconstruction loop before each forward; None: no regulariser
        self._reg: torch.Tensor | None = None
        self.report_reg = True  # False: the regulariser's value is not computed (its gradient still is)
        self.sign: SignRounding | None = None  # rounding="sign": AutoRound-style variables instead of V
        self.enabled = True

    def _grid(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = (self.scale, self.zero) if rows is None else (self.scale[rows], self.zero[rows])
        if self.log_scale is not None:
            scale = scale * torch.exp(self.log_scale if rows is None else self.log_scale[rows])
        return scale.unsqueeze(-1), zero.unsqueeze(-1).float()

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor, p: float | None) -> None:
        """The grid from the Lp search (`p`), or from each row's or group's [min, max] with `p=None`."""
        scale, zero = search_weight_range(weight, self.bits, self.symmetric, self.group_size, p)
        self.scale.copy_(scale)
        self.zero.copy_(zero.to(torch.uint8))

    @torch.no_grad()
    def init_adaround(self, weight: torch.Tensor) -> None:
        """V such that h(V) equals the fractional part of w / s, i.e. the soft weight starts at the FP weight
        (or at `self.start`, which is then consumed)."""
        margin = None
        if self.start is not None:
            weight, self.start, margin = self.start, None, self.start_margin
        scale, zero = self._grid()
        qmin, qmax = qrange(self.bits)
        w = group_view(weight.detach().float(), self.group_size) / scale
        floor = w.floor()
        rest = w.sub_(floor).clamp_(1e-4, 1 - 1e-4)
        if margin is not None:  # h near the decision round-to-nearest takes (V >= 0 iff rest >= ½ holds still)
            rest = torch.where(rest >= 0.5, 1.0 - margin, margin)
        self.w_floor = floor.add_(zero).clamp_(qmin - 2, qmax + 1).to(_code_dtype(self.bits))
        del floor
        self.alpha = nn.Parameter(rest.sub_(GAMMA).reciprocal_().mul_(ZETA - GAMMA).sub_(1).log_().neg_())

    @torch.no_grad()
    def init_sign(self, weight: torch.Tensor, learn_range: bool) -> list[nn.Parameter]:
        """Starts signed-gradient rounding from `weight` (or from `self.start`, then consumed) on the current grid;
        `learn_range`: the grid's min and max are learned too. Returns the parameters to learn."""
        base = self.start if self.start is not None else weight
        self.start = None
        scale, zero = self._grid()
        self.sign = SignRounding(group_view(base.detach().float(), self.group_size), scale, zero, self.bits,
                                 self.symmetric, learn_range)  # fmt: skip
        return self.sign.parameters_to_learn()

    @torch.no_grad()
    def round_start(self) -> None:
        """Fixes the codes nearest to the initialiser's weight (`start`, e.g. GPTQ's), with no reconstruction."""
        if self.start is not None:
            self.init_adaround(self.start)
            self.finish_learning()

    def soft_rounding(self) -> torch.Tensor:
        if self.hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def learn_scale(self) -> nn.Parameter:
        """Starts learning the dequantization step (one log-factor per row and group); returns the parameter."""
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale))
        return self.log_scale

    @torch.no_grad()
    def finish_learning(self) -> None:
        """Ends reconstruction: the rounding becomes hard and a learned step goes into `scale`, as the very floats
        the forward pass used (so the frozen and the saved model compute what was evaluated)."""
        if self.sign is not None:  # its codes and grid become AdaRound's hard form: w_floor + 0
            codes, scale, zero = self.sign.final()
            self.scale.copy_(scale.squeeze(-1).expand_as(self.scale))
            self.zero.copy_(zero.squeeze(-1).expand_as(self.zero).to(torch.uint8))
            self.w_floor = codes.to(_code_dtype(self.bits))
            self.alpha = nn.Parameter(torch.full_like(codes, -100.0), requires_grad=False)
            self.sign = None
        self.harden()
        if self.log_scale is not None:
            self.scale.copy_(self.scale * torch.exp(self.log_scale))
            self.log_scale = None
        self.hard = False

    @torch.no_grad()
    def undecided(self, low: float = 0.01, high: float = 0.99) -> tuple[int, int]:
        """(number of h strictly between `low` and `high`, number of h): how far the rounding is from hard."""
        if self.alpha is None:
            return 0, 0
        count = 0
        for r in row_slices(self.alpha.shape[0], self.alpha[0].numel(), True):
            h = _soft(self.alpha[r])
            count += int(((h > low) & (h < high)).sum())
        return count, self.alpha.numel()

    @torch.no_grad()
    def harden_fraction(self, fraction: float) -> None:
        """Progressive hardening: the `fraction` of rounding variables with h farthest from ½ (largest |V|),
        those already hard included, are set hard for good (|V| = 100: h is exactly 0 or 1, its gradient 0)."""
        if self.alpha is None or fraction <= 0:
            return
        magnitude = self.alpha.abs().reshape(-1)
        n = magnitude.numel()
        keep_soft = n - min(n, math.ceil(fraction * n))
        threshold = float(torch.kthvalue(magnitude, keep_soft).values) if keep_soft > 0 else -1.0
        chosen = (magnitude > threshold).reshape(self.alpha.shape)
        self.alpha.data = torch.where(chosen, torch.where(self.alpha >= 0, 100.0, -100.0), self.alpha)

    def release_weight(self, module: nn.Module) -> None:
        """Once V holds the rounding, the FP weight is needed no more (only its shape): it goes to `meta`."""
        if self.alpha is not None or self.sign is not None:
            module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)

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
        if self.sign is not None:
            return self.sign().reshape(weight.shape)
        scale, zero = self._grid(rows)
        if self.alpha is None:
            q = quantize_codes(group_view(weight, self.group_size), scale, zero, self.bits)
        else:  # `weight` may be on `meta` here (see release_weight): only its shape is used
            qmin, qmax = qrange(self.bits)
            # differentiable by autograd; a Linear learning V goes through `linear()` instead
            h = self.soft_rounding()  # exactly 0 or 1 once `harden()` has run
            q = torch.clamp(h + self.w_floor, qmin, qmax)
        return dequantize_codes(q, scale, zero).reshape(weight.shape)

    @property
    def learning(self) -> bool:
        """True while V is being learned and this forward pass records a graph."""
        learns = self.sign is not None or (self.alpha is not None and self.alpha.requires_grad)
        return learns and torch.is_grad_enabled()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear with the soft-rounded weight while V is learned (see _SoftRoundedLinear)."""
        if self.sign is not None:
            return nn.functional.linear(x, self.sign().reshape(self.sign.base.shape[0], -1).to(x.dtype), bias)
        scale, zero = self._grid()
        qmin, qmax = qrange(self.bits)
        y, reg = _SoftRoundedLinear.apply(
            x, self.alpha, self.w_floor, zero, scale, bias, qmin, qmax, self.beta, self.report_reg
        )
        self._reg = reg if self.beta is not None else None
        return y

    @torch.no_grad()
    def code_chunks(self, weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, their uint8 codes) of the final (hard-rounded) weight, a row chunk at a time: the float
        temporaries of a whole LM head would be GBs."""
        for rows in row_slices(*weight.shape):
            yield rows, self._codes(weight, rows)

    def _codes(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        scale, zero = self._grid(rows)
        if self.alpha is None:
            q = quantize_codes(group_view(weight[rows].detach().float(), self.group_size), scale, zero, self.bits)
        else:
            qmin, qmax = qrange(self.bits)
            q = torch.clamp(self.w_floor[rows] + (self.alpha[rows] >= 0).float(), qmin, qmax)
        return q.reshape(-1, weight.shape[1]).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float weight of integer codes (of all rows, or of `rows` only)."""
        scale, zero = self._grid(rows)
        q = group_view(codes.float(), self.group_size)
        return q.sub_(zero).mul_(scale).reshape(codes.shape)  # in place: codes.float() is already a copy

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


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
