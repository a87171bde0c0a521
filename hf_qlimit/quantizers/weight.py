"""Weight quantizer: the per-channel (or per-group) affine grid of one weight, all a loaded model needs, and,
during reconstruction, the rounding state attached to it.

Without a rounding state the weight is rounded to nearest. Reconstruction attaches one (`begin_adaround`,
`begin_sign`: quantizers/adaround.py, quantizers/signround.py) and drives it; `finish_learning` turns it into
the decided codes, which `nn.modules` packs when it freezes the module (`code_chunks`, then `clear_rounding`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from .adaround import AdaRoundState
from .chunks import row_slices
from .fake_quant import dequantize_codes, quantize_codes
from .gptq import gptq_compensated_weight
from .range_search import group_view, search_weight_range
from .signround import SignRoundState


class RoundingState(Protocol):
    """What a rounding attached to a `WeightQuantizer` answers; `scale` and `zero` are the quantizer's own,
    of shape (rows, groups). Grouped tensors have shape (rows, groups, group_size)."""

    learning: bool  # it has variables to learn: a forward pass with autograd on builds their graph

    def fake_quant(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, grouped."""

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        """F.linear with the fake-quantized weight, while learning."""

    def codes(self, rows: slice) -> torch.Tensor:
        """The integer codes of `rows` (grouped; float or uint8) as the rounding stands."""

    def final(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, zero, uint8 codes, grouped) that keep what the forward pass computes, with the rounding hard."""


class DecidedCodes(nn.Module):
    """The final codes of a weight whose rounding reconstruction decided, until its module freezes them."""

    learning = False

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", codes.to(torch.uint8), persistent=False)

    def fake_quant(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(self.values.float(), scale.unsqueeze(-1), zero.unsqueeze(-1).float())

    def codes(self, rows: slice) -> torch.Tensor:
        return self.values[rows]

    def final(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return scale, zero, self.values


class WeightQuantizer(nn.Module):
    """The grid (`scale`, `zero` per row and group) of one weight; the weight itself stays in the owning module,
    and `forward(weight)` returns its fake-quantized copy."""

    fixed_grid = False  # True: a file format fixes the grid (k-quants), reconstruction learns the rounding only

    def __init__(self, bits: int, shape: tuple[int, int], group_size: int | None, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size is None or group_size >= shape[1] else shape[1] // group_size
        self.register_buffer("scale", torch.ones(shape[0], groups))
        self.register_buffer("zero", torch.zeros(shape[0], groups, dtype=torch.uint8))
        # a RoundingState or None, set by `begin_adaround`, `begin_sign`, `finish_learning` and `clear_rounding`
        self.register_module("rounding", None)
        self._enabled = True

    @property
    def enabled(self) -> bool:
        """False: `forward` returns the weight as it is (see `calibration.quant_state`)."""
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled

    @property
    def plain_grid(self) -> bool:
        """Whether w = (q − zero)·scale gives the weight, as kernels and block encodings read it (a k-quant grid
        with offsets has a float one besides: quantizers/kquant.py)."""
        return True

    def grid(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero as float) of all rows or of `rows`, shaped (rows, groups, 1) to broadcast over a group."""
        scale, zero = (self.scale, self.zero) if rows is None else (self.scale[rows], self.zero[rows])
        return scale.unsqueeze(-1), zero.unsqueeze(-1).float()

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor, p: float | None) -> None:
        """The grid from the Lp search (`p`), or from each row's or group's [min, max] with `p=None`."""
        scale, zero = search_weight_range(weight, self.bits, self.symmetric, self.group_size, p)
        self.scale.copy_(scale)
        self.zero.copy_(zero.to(torch.uint8))

    @torch.no_grad()
    def compensated_weight(self, weight: torch.Tensor, hessian: torch.Tensor, act_order: bool = False) -> torch.Tensor:
        """GPTQ's compensated weight w̃ on this grid (`gptq_compensated_weight`), from the inputs' Hessian."""
        return gptq_compensated_weight(
            weight, hessian, self.scale, self.zero, self.bits, self.group_size, act_order=act_order
        )

    # -- rounding state ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def begin_adaround(self, start: torch.Tensor, margin: float | None = None) -> AdaRoundState:
        """Attaches AdaRound's variables, the soft weight starting at `start` (the FP weight, or GPTQ's w̃), and
        returns them; with `margin`, h starts that close to round-to-nearest's decision (see `AdaRoundState`)."""
        self.rounding = AdaRoundState(start, self.scale, self.zero, self.bits, self.group_size, margin)
        return self.rounding

    @torch.no_grad()
    def begin_sign(self, start: torch.Tensor, learn_range: bool) -> SignRoundState:
        """Attaches signed-gradient rounding from `start` (the FP weight, or GPTQ's w̃) on the current grid, and
        returns it; `learn_range`: the grid's min and max are learned too."""
        scale, zero = self.grid()
        self.rounding = SignRoundState(
            group_view(start.detach().float(), self.group_size), scale, zero, self.bits, self.symmetric, learn_range
        )
        return self.rounding

    @torch.no_grad()
    def round_start(self, start: torch.Tensor, margin: float | None = None) -> None:
        """Fixes the codes nearest to `start` (e.g. GPTQ's w̃), with no reconstruction: AdaRound's hard rounding
        at its start, so the very codes `begin_adaround(start, margin)` would begin with."""
        self.begin_adaround(start, margin)
        self.finish_learning()

    @torch.no_grad()
    def finish_learning(self) -> None:
        """Ends reconstruction: the rounding becomes the decided codes, and a learned grid goes into `scale` and
        `zero` as the very floats the forward pass used."""
        if self.rounding is None:
            return
        scale, zero, codes = self.rounding.final(self.scale, self.zero)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero.copy_(zero.expand_as(self.zero).to(torch.uint8))
        self.rounding = DecidedCodes(codes)

    def clear_rounding(self) -> None:
        """Drops the rounding state (the module holds the codes now)."""
        self.rounding = None

    @property
    def learning(self) -> bool:
        """True while a rounding state learns and this forward pass records a graph."""
        return self.rounding is not None and self.rounding.learning and torch.is_grad_enabled()

    # -- fake quantization -----------------------------------------------------------------------------------------

    def forward(self, weight: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight; with `rows`, `weight` holds only those rows (an embedding lookup, never
        with a rounding state). With a rounding state `weight` may be on `meta`: only its shape is used."""
        if not self._enabled:
            return weight
        if self.rounding is not None:
            return self.rounding.fake_quant(self.scale, self.zero).reshape(weight.shape)
        scale, zero = self.grid(rows)
        q = quantize_codes(group_view(weight, self.group_size), scale, zero, self.bits)
        return dequantize_codes(q, scale, zero).reshape(weight.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear with the fake-quantized weight while the rounding state learns (see `learning`)."""
        return self.rounding.linear(x, bias, self.scale, self.zero)

    @torch.no_grad()
    def code_chunks(self, weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, their uint8 codes) of the final (hard-rounded) weight, a row chunk at a time: the float
        temporaries of a whole LM head would be GBs."""
        for rows in row_slices(*weight.shape):
            if self.rounding is not None:
                q = self.rounding.codes(rows)
            else:
                scale, zero = self.grid(rows)
                q = quantize_codes(group_view(weight[rows].detach().float(), self.group_size), scale, zero, self.bits)
            yield rows, q.reshape(-1, weight.shape[1]).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float weight of integer codes (of all rows, or of `rows` only)."""
        scale, zero = self.grid(rows)
        q = group_view(codes.float(), self.group_size)
        return q.sub_(zero).mul_(scale).reshape(codes.shape)  # in place: codes.float() is already a copy

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"
