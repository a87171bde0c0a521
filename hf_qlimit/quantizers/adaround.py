"""Weight quantizer: per-channel (or per-group) affine grid, rounded to nearest or by AdaRound."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .fake_quant import dequantize_codes, qrange, quantize_codes
from .range_search import group_view, search_weight_range

ROW_CHUNK = 1 << 22  # weight elements handled at a time when a whole matrix need not be in float at once
# ... and in the elementwise loops of every reconstruction iteration, whose temporaries add to its peak
TEMP_CHUNK = 1 << 20
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h can reach exactly 0 and 1
_RECOMPUTE = object()  # marks a saved soft weight that the backward pass recomputes


def row_slices(rows: int, cols: int, temporaries: bool = False) -> Iterator[slice]:
    """Consecutive row ranges of a (rows, cols) matrix, each of about ROW_CHUNK (TEMP_CHUNK) elements, at
    least one row."""
    step = max(1, (TEMP_CHUNK if temporaries else ROW_CHUNK) // cols)
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))


def _soft(alpha: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1), in place on a fresh tensor."""
    return torch.sigmoid(alpha).mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)


def _rounding_reg(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β), a row chunk at a time: its temporaries would be weight-sized."""
    return sum((1 - (2 * h[r] - 1).abs_().pow_(beta)).sum() for r in row_slices(h.shape[0], h[0].numel(), True))


class _SoftRounded(torch.autograd.Function):
    """AdaRound's soft-rounded weight and its rounding regulariser in one op, differentiable in V.

    w_q = (clamp(c + h(V), qmin, qmax) − z) · s  and  R = Σ (1 − |2h − 1|^β),  c = ⌊w/s⌋ + z.
    Autograd would keep four weight-sized intermediates per Linear for the backward pass; this keeps none and
    recomputes σ(V) there a row chunk at a time: that was most of a large block's reconstruction memory.
    """

    @staticmethod
    def forward(ctx, alpha, code_floor, zero, scale, qmin: int, qmax: int, beta: float | None):
        h = _soft(alpha)
        reg = _rounding_reg(h, beta) if beta is not None else alpha.new_zeros(())
        out = h.add_(code_floor).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        ctx.save_for_backward(alpha, code_floor, scale)
        ctx.bounds, ctx.beta = (qmin, qmax), beta
        return out, reg

    @staticmethod
    def backward(ctx, grad_out, grad_reg):
        alpha, code_floor, scale = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        grad_alpha = torch.empty_like(alpha)
        for r in row_slices(alpha.shape[0], alpha[0].numel(), True):
            sig = torch.sigmoid(alpha[r])
            stretched = sig * (ZETA - GAMMA) + GAMMA
            h = stretched.clamp(0, 1)
            inner = code_floor[r] + h
            # clamp passes the gradient on [min, max], both ends included, as torch.clamp does
            grad_h = grad_out[r] * scale[r] * ((inner >= qmin) & (inner <= qmax))
            if ctx.beta is not None:
                u = h.mul_(2).sub_(1)
                grad_h -= grad_reg * 2 * ctx.beta * u.abs().pow(ctx.beta - 1) * u.sign()
            live = (stretched >= 0) & (stretched <= 1)
            grad_alpha[r] = grad_h.mul_(live).mul_(ZETA - GAMMA).mul_(sig).mul_(1 - sig)
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
        # ⌊w/s⌋ + z as int8 (int16 above 6 bits), fixed while V is learned; clamped to [qmin − 2, qmax + 1],
        # which changes neither clamp(c + h) nor its gradient for h in [0, 1]
        self.register_buffer("w_floor", None, persistent=False)
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
        scale, zero = self._grid()
        qmin, qmax = qrange(self.bits)
        w = group_view(weight.detach().float(), self.group_size) / scale
        floor = w.floor()
        rest = w.sub_(floor).clamp_(1e-4, 1 - 1e-4)
        code_dtype = torch.int8 if qmax + 1 <= torch.iinfo(torch.int8).max else torch.int16
        self.w_floor = floor.add_(zero).clamp_(qmin - 2, qmax + 1).to(code_dtype)
        del floor
        self.alpha = nn.Parameter(rest.sub_(GAMMA).reciprocal_().mul_(ZETA - GAMMA).sub_(1).log_().neg_())

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def release_weight(self, module: nn.Module) -> None:
        """Once V holds the rounding, the FP weight is needed no more (only its shape): it goes to `meta`."""
        if self.alpha is not None:
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
        scale, zero = self._grid(rows)
        if self.alpha is None:
            q = quantize_codes(group_view(weight, self.group_size), scale, zero, self.bits)
        else:  # `weight` may be on `meta` here (see release_weight): only its shape is used
            qmin, qmax = qrange(self.bits)
            if rows is None and self.learning:
                out, reg = self._soft_weight(self.beta)
                self._reg = reg if self.beta is not None else None
                return out.reshape(weight.shape)
            h = self.soft_rounding()  # exactly 0 or 1 once `harden()` has run
            q = torch.clamp(h.add_(self.w_floor), qmin, qmax)
        return dequantize_codes(q, scale, zero).reshape(weight.shape)

    @property
    def learning(self) -> bool:
        """True while V is being learned and this forward pass records a graph."""
        return self.alpha is not None and self.alpha.requires_grad and torch.is_grad_enabled()

    @contextmanager
    def recompute_when_saved(self, w_q: torch.Tensor) -> Iterator[None]:
        """Ops run inside that save `w_q` for their backward (the Linear) save nothing: it is recomputed from V
        when the backward pass needs it. A block's soft weights would otherwise all live until its backward."""
        # plain values only: autograd keeps the hooks until backward, and a captured w_q would live as long
        storage, device, dtype = w_q.untyped_storage().data_ptr(), w_q.device, w_q.dtype

        def pack(t: torch.Tensor):
            if t.device == device and t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
                return (_RECOMPUTE, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(packed):
            if isinstance(packed, tuple) and packed and packed[0] is _RECOMPUTE:
                with torch.no_grad():  # the very ops of _SoftRounded.forward: bit-identical
                    w, _ = self._soft_weight(None)
                return w.as_strided(*packed[1:])
            return packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _soft_weight(self, beta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = self._grid()
        qmin, qmax = qrange(self.bits)
        return _SoftRounded.apply(self.alpha, self.w_floor, zero, scale, qmin, qmax, beta)

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


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β of the rounding regulariser at `step`, or None during warm-up (no regulariser)."""
    warm = int(warmup * total)
    if step < warm:
        return None
    progress = (step - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)
