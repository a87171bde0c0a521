"""GGUF k-quant grids (`QLimitConfig(weight_format="gguf:q4_k")` ...): the weight grid llama.cpp reads, so the
codes reconstruction decides are exported as they are.

A k-quant row is cut into super-blocks of 256 weights, each holding an fp16 step d (and dmin) and, per sub-block,
an integer multiplier l (and m) of it (gguf-py's quants.py, llama.cpp's ggml-quants.c):

- Q6_K: 16 sub-blocks of 16, w = d·l·(q − 32), q in [0, 63], l int8;        symmetric, zero 32
- Q3_K: 16 sub-blocks of 16, w = d·l·(q − 4),  q in [0, 7],  l = sc − 32 with sc 6-bit; symmetric, zero 4
- Q4_K / Q5_K: 8 sub-blocks of 32, w = d·l·q − dmin·m, q in [0, 15] / [0, 31], l and m 6-bit
- Q2_K: 16 sub-blocks of 16, w = d·l·q − dmin·m, q in [0, 3], l and m 4-bit

`KQuantizer` starts from the usual Lp range search per sub-block, then snaps the sub-block scales (and offsets)
onto that structure: s = fp32(d)·l exactly, the product llama.cpp forms. The symmetric types are then plain
(q − z)·s grids. The others carry a float offset o = dmin·m besides: they quantize w + o on a grid with zero 0
(w = q·s − o), a path of their own, so the integer-zero grids compute what they always did. Reconstruction
learns the rounding only: the grid stays fixed (`fixed_grid`, see calibration/rounding.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .adaround import AdaRoundState
from .chunks import row_slices
from .fake_quant import quantize_codes
from .formats import GGUF_FORMATS
from .range_search import group_view
from .signround import SignRoundState
from .weight import DecidedCodes, WeightQuantizer

SUPER_BLOCK = 256
FP16_TINY, FP16_MAX = 2.0**-24, float(torch.finfo(torch.float16).max)  # d and dmin stay in fp16's range


class KLayout(NamedTuple):
    scale_max: int  # the largest sub-block multiplier l
    min_max: int  # the largest offset multiplier m; 0: a symmetric type, no offsets


K_LAYOUTS = {
    "gguf:q2_k": KLayout(15, 15),
    "gguf:q3_k": KLayout(31, 0),
    "gguf:q4_k": KLayout(63, 63),
    "gguf:q5_k": KLayout(63, 63),
    "gguf:q6_k": KLayout(127, 0),
}


def weight_quantizer_for(
    bits: int, shape: tuple[int, int], group_size: int | None, symmetric: bool, weight_format: str | None = None
) -> WeightQuantizer:
    """The quantizer of a (rows, cols) weight: a k-quant format's `KQuantizer`, else the affine grid of `bits`,
    `group_size` and `symmetric` (which a GGUF block type's format fixes too)."""
    if weight_format in K_LAYOUTS:
        return KQuantizer(weight_format, shape)
    return WeightQuantizer(bits, shape, group_size, symmetric)


def fp16_step(step: torch.Tensor) -> torch.Tensor:
    """`step` rounded to fp16 (kept in float32), never 0: a super-block's d or dmin as llama.cpp stores it."""
    return step.clamp(FP16_TINY, FP16_MAX).half().float()


def grid_error(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, offset: bool, qmax: int, p: float):
    """Σ |w_q − w|^p per sub-block of the grouped `w`: w_q = q·s − o with `offset` (shift = o), else
    (q − z)·s (shift = z); `scale` and `shift` have shape (rows, groups)."""
    s, t = scale.unsqueeze(-1), shift.unsqueeze(-1)
    if offset:
        w_q = torch.clamp(torch.round((w + t) / s), 0, qmax) * s - t
    else:
        w_q = (torch.clamp(torch.round(w / s) + t, 0, qmax) - t) * s
    return (w_q - w).abs_().pow_(p).sum(-1)


class KQuantizer(WeightQuantizer):
    """A `WeightQuantizer` on a k-quant format's grid. `scale` (and `zero`) hold the effective sub-block grid as
    the base class reads it; `super_scale` (d), `sub_scale` (l) and, for the types with offsets, `super_min`
    (dmin) and `sub_min` (m) hold the structure the GGUF exporter writes. All are saved with the checkpoint."""

    fixed_grid = True

    def __init__(self, weight_format: str, shape: tuple[int, int]) -> None:
        fmt, self.layout = GGUF_FORMATS[weight_format], K_LAYOUTS[weight_format]
        if shape[1] % SUPER_BLOCK:
            raise ValueError(
                f"{weight_format} needs rows that split into super-blocks of {SUPER_BLOCK} weights, got {shape[1]}: "
                "the layer config takes llama.cpp's fallback type for such a module (formats.fitting_format)."
            )
        super().__init__(fmt.bits, shape, fmt.group, fmt.symmetric)
        self.weight_format = weight_format
        rows, groups = shape[0], shape[1] // fmt.group
        supers = shape[1] // SUPER_BLOCK
        self.register_buffer("super_scale", torch.zeros(rows, supers))
        self.register_buffer("sub_scale", torch.zeros(rows, groups, dtype=torch.int8))
        if not self.symmetric:
            self.register_buffer("super_min", torch.zeros(rows, supers))
            self.register_buffer("sub_min", torch.zeros(rows, groups, dtype=torch.uint8))

    @property
    def plain_grid(self) -> bool:
        return self.symmetric

    def offset(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """o = dmin·m of all rows or of `rows`, shape (rows, groups) (the types with offsets only)."""
        dmin, m = (self.super_min, self.sub_min) if rows is None else (self.super_min[rows], self.sub_min[rows])
        return dmin.repeat_interleave(SUPER_BLOCK // self.group_size, dim=1) * m.float()

    def shifted(self, weight: torch.Tensor) -> torch.Tensor:
        """w + o, the weight the zero-0 grid of a type with offsets rounds (`weight` itself on a symmetric type)."""
        if self.symmetric:
            return weight
        grouped = group_view(weight.detach().float(), self.group_size) + self.offset().unsqueeze(-1)
        return grouped.reshape(weight.shape)

    # -- the grid ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor, p: float | None) -> None:
        """The Lp range search per sub-block, then its scales (and offsets) snapped onto the k-quant structure."""
        super().init_range(weight, p)
        w = group_view(weight.detach().float(), self.group_size)
        per = SUPER_BLOCK // self.group_size
        rows = self.scale.shape[0]
        target_offset = self.scale * self.zero.float()  # −min of each sub-block's grid (asymmetric types)
        d = fp16_step(self.scale.view(rows, -1, per).amax(-1) / self.layout.scale_max)
        scales = self._candidates(self.scale, d, 1, self.layout.scale_max)
        offsets = [self.zero.float()]
        dmin = torch.zeros_like(d)
        if not self.symmetric:
            peak = target_offset.view(rows, -1, per).amax(-1)
            dmin = torch.where(peak > 0, fp16_step(peak / self.layout.min_max), torch.zeros_like(peak))
            offsets = self._candidates(target_offset, dmin, 0, self.layout.min_max)
        best_l, best_m = self._best_pair(w, d, dmin, scales, offsets, 2.0 if p is None else p)
        self.super_scale.copy_(d)
        self.sub_scale.copy_(best_l.to(torch.int8))
        self.scale.copy_(d.repeat_interleave(per, dim=1) * best_l)
        if not self.symmetric:
            self.super_min.copy_(dmin)
            self.sub_min.copy_(best_m.to(torch.uint8))
            self.zero.zero_()

    def _candidates(self, value: torch.Tensor, step: torch.Tensor, low: int, high: int) -> list[torch.Tensor]:
        """The integer multiples of the super-block `step` just below and above each sub-block's `value`."""
        per = SUPER_BLOCK // self.group_size
        ratio = value / step.repeat_interleave(per, dim=1)
        ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0)  # dmin 0: every offset is 0
        floor = ratio.floor()
        return [floor.clamp(low, high), (floor + 1).clamp(low, high)]

    def _best_pair(self, w, d, dmin, scales, offsets, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(l, m) of each sub-block, among the candidates, of least Lp error (m: the zero on symmetric types)."""
        per = SUPER_BLOCK // self.group_size
        d, dmin = d.repeat_interleave(per, dim=1), dmin.repeat_interleave(per, dim=1)
        qmax = 2**self.bits - 1
        best_err = torch.full_like(self.scale, float("inf"))
        best_l, best_m = scales[0].clone(), offsets[0].clone()
        chunks = list(row_slices(w.shape[0], w.shape[1] * w.shape[2]))
        for mult in scales:
            for m in offsets:
                scale, shift = d * mult, (m if self.symmetric else dmin * m)
                offset = not self.symmetric
                err = torch.cat([grid_error(w[r], scale[r], shift[r], offset, qmax, p) for r in chunks])
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_l, best_m = torch.where(better, mult, best_l), torch.where(better, m, best_m)
        return best_l, best_m

    # -- rounding: the grid stays, only the codes are learned ----------------------------------------------------

    @torch.no_grad()
    def begin_adaround(self, start: torch.Tensor, margin: float | None = None) -> AdaRoundState:
        return super().begin_adaround(self.shifted(start), margin)

    @torch.no_grad()
    def begin_sign(self, start: torch.Tensor, learn_range: bool) -> SignRoundState:
        """Signed-gradient rounding on the fixed grid (`learn_range` is ignored: see calibration/rounding.py)."""
        scale, zero = self.grid()
        base = group_view(self.shifted(start).detach().float(), self.group_size)
        # symmetric=True: the state keeps (scale, zero) as given, the zero-0 grid of the offset types included
        self.rounding = SignRoundState(base, scale, zero, self.bits, True, False)
        return self.rounding

    @torch.no_grad()
    def finish_learning(self) -> None:
        """The decided codes; the snapped grid stays as it is, and must be the one the rounding learned on."""
        if self.rounding is None:
            return
        scale, _, codes = self.rounding.final(self.scale, self.zero)
        if not torch.equal(scale.expand_as(self.scale), self.scale):
            raise RuntimeError(
                f"A {self.weight_format} grid was given learned scales: its snapped ones must stay (the "
                "reconstruction turns learn_weight_scale off for k-quant grids, calibration/rounding.py)."
            )
        self.rounding = DecidedCodes(codes)

    def compensated_weight(self, weight: torch.Tensor, hessian: torch.Tensor, act_order: bool = False):
        w = super().compensated_weight(self.shifted(weight), hessian, act_order)
        if self.symmetric:
            return w
        return (group_view(w, self.group_size) - self.offset().unsqueeze(-1)).reshape(w.shape)

    # -- fake quantization and codes of the types with offsets: w = q·s − o ----------------------------------------

    def forward(self, weight: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.symmetric or not self.enabled:
            return super().forward(weight, rows)
        offset = self.offset(rows).unsqueeze(-1)
        if self.rounding is not None:
            return (self.rounding.fake_quant(self.scale, self.zero) - offset).reshape(weight.shape)
        scale, _ = self.grid(rows)
        q = quantize_codes(group_view(weight, self.group_size) + offset, scale, 0, self.bits)
        return (q * scale - offset).reshape(weight.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x·(q·s − o)ᵀ: the rounding's x·(q·s)ᵀ, less x·oᵀ from the per-group sums of x."""
        y = super().linear(x, bias)
        if self.symmetric:
            return y
        offset = self.offset()
        sums = x.reshape(*x.shape[:-1], offset.shape[1], self.group_size).sum(-1)
        return y - sums @ offset.t().to(x.dtype)

    @torch.no_grad()
    def code_chunks(self, weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        if self.symmetric or self.rounding is not None:
            yield from super().code_chunks(weight)
            return
        for rows in row_slices(*weight.shape):
            scale, _ = self.grid(rows)
            shifted = group_view(weight[rows].detach().float(), self.group_size) + self.offset(rows).unsqueeze(-1)
            yield rows, quantize_codes(shifted, scale, 0, self.bits).reshape(-1, weight.shape[1]).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """q·s − o in float32, the products and difference gguf-py's dequantizers form (exact for llama.cpp)."""
        if self.symmetric:
            return super().dequantize(codes, rows)
        scale, _ = self.grid(rows)
        q = group_view(codes.float(), self.group_size)
        return q.mul_(scale).sub_(self.offset(rows).unsqueeze(-1)).reshape(codes.shape)

    def extra_repr(self) -> str:
        return f"{self.weight_format}, {super().extra_repr()}"
