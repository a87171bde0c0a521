"""An `nn.Embedding` subclass with its own forward (Gemma's lookup × embed_scale), quantized and keeping that
forward: the subclass's module stays as `wrapped`, its weight taken over (nn/wrapping.py), and runs through
`torch.func.functional_call` on the dequantized table. No family is special-cased.

The forward dequantizes the whole table (the subclass may do anything with it); "cached" keeps that copy.
The table is handed over in the dtype the FP weight had (followed through `.to()`), which such forwards read,
e.g. Gemma's `self.embed_scale.to(self.weight.dtype)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .embedding import QuantEmbedding
from .wrapping import call_with, placeholder_dtype, take_parameter


class QuantWrappedEmbedding(QuantEmbedding):
    """`QuantEmbedding` (codes, grid, tied-head codes) whose forward is the wrapped module's own."""

    def __init__(
        self,
        wrapped: nn.Embedding,
        weight_bits: int,
        weight_sym: bool = False,
        frozen: bool = True,
        group_size: int | None = None,
        weight_format: str | None = None,
    ) -> None:
        super().__init__(
            wrapped.num_embeddings,
            wrapped.embedding_dim,
            wrapped.padding_idx,
            weight_bits,
            weight_sym,
            frozen=frozen,
            group_size=group_size,
            weight_format=weight_format,
        )
        self.wrapped = wrapped  # its weight taken over by `from_module`

    @classmethod
    def from_module(cls, module: nn.Embedding, spec: dict, weight_sym: bool, frozen: bool) -> QuantWrappedEmbedding:
        """Around the FP table for calibration, or empty (`frozen`) for a checkpoint to fill."""
        fp_weight = take_parameter(module, "weight")
        new = cls(module, spec["w"], weight_sym, frozen, spec.get("group"), spec.get("format"))
        if not frozen:
            new.weight = fp_weight
        return new

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        table = self.quantized_weight().to(placeholder_dtype(self.wrapped, "weight"))
        return call_with(self.wrapped, {"weight": table}, (ids, *args), kwargs)
