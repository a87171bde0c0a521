"""`QuantEmbedding`: the quantized `nn.Embedding` (the weight handling it shares with `QuantLinear`: modules.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .modules import QuantLinear, QuantWeightMixin


class QuantEmbedding(QuantWeightMixin, nn.Module):
    """`nn.Embedding` with one quantization scale per embedding row, or per row and group (`group_size`, which
    a model whose LM head is tied to its embedding uses: the head's grid, so both get the same codes)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
        weight_bits: int,
        weight_sym: bool = False,
        frozen: bool = True,
        group_size: int | None = None,
        weight_format: str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        if not frozen:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self._init_weight(num_embeddings, embedding_dim, weight_bits, group_size, weight_sym, frozen, weight_format)
        self.__dict__["_tied_head"] = None  # not a submodule: the head stays where the model has it

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: dict, weight_sym: bool) -> QuantEmbedding:
        module = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            spec["w"],
            weight_sym,
            frozen=False,
            group_size=spec.get("group"),
            weight_format=spec.get("format"),
        )
        module.weight = emb.weight
        return module

    @property
    def reads_head_codes(self) -> bool:
        """Whether this embedding reads its codes from the LM head's (`tie_codes`) instead of holding its own."""
        return self.__dict__.get("_tied_head") is not None

    @torch.no_grad()
    def tie_codes(self, head: QuantLinear) -> None:
        """Reads the codes from `head` (same codes, checked by the caller) and drops this module's own copy."""
        memory.drop_file_pages(self._buffers["weight"])
        del self._buffers["weight"]
        self.__dict__["_tied_head"] = head

    @torch.no_grad()
    def untie_codes(self) -> None:
        head = self.__dict__.get("_tied_head")
        if head is not None:
            self.__dict__["_tied_head"] = None  # first: `weight` must stop resolving to the head's codes
            self.register_buffer("weight", head.packed_weight().clone().to(self.weight_quantizer.scale.device))

    def packed_weight(self) -> torch.Tensor:
        head = self.__dict__.get("_tied_head")
        return super().packed_weight() if head is None else head.packed_weight()

    def code_rows(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        head = self.__dict__.get("_tied_head")
        if head is None:
            return super().code_rows(rows)
        device = head.weight_quantizer.scale.device
        codes = head.code_rows(rows.to(device) if isinstance(rows, torch.Tensor) else rows)
        return codes.to(self.weight_quantizer.scale.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.untie_codes()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._has_cache() or (self.is_frozen and self.inference_mode == "cached"):
            return F.embedding(ids, self.quantized_weight(), self.padding_idx)
        # The grid is per row: quantizing only the rows looked up equals quantizing the table first, without
        # materialising a vocabulary-sized fp32 copy per call (GBs for a large vocabulary).
        flat = ids.reshape(-1)
        if self.is_frozen:
            rows = self.dequantize_rows(flat)
        else:
            rows = self.weight_quantizer(self.weight.index_select(0, flat), rows=flat)
        return rows.reshape(*ids.shape, self.cols)
