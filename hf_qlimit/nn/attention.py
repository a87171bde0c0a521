"""Attention with quantized matmul inputs (Q·Kᵀ and P·V): the quantizers a block's attention module carries
and the eager attention function registered with transformers as "qlimit"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import ActQuantizer, first_token
from ..quantizers.act_grids import Log2Quantizer


class AttentionQuantizers(nn.Module):
    """Quantizers of the attention matmul inputs: Q and K for Q·Kᵀ, the probabilities P and V for P·V.

    The probabilities get `prob_bits` (default: `act_bits`) on a "uniform" or "log2" grid (`prob_grid`)."""

    def __init__(
        self, act_bits: int, act_sym: bool = False, prob_bits: int | None = None, prob_grid: str = "uniform"
    ) -> None:
        super().__init__()
        self.query = ActQuantizer(act_bits, act_sym)
        self.key = ActQuantizer(act_bits, act_sym)
        self.value = ActQuantizer(act_bits, act_sym)
        self.probs = _probability_quantizer(act_bits if prob_bits is None else prob_bits, prob_grid)


def _probability_quantizer(bits: int, grid: str) -> ActQuantizer:
    # Softmax outputs lie in [0, 1]: an asymmetric uniform grid wastes no code on negatives, and a log2 grid keeps
    # the many small probabilities apart instead of rounding them to 0.
    return Log2Quantizer(bits) if grid == "log2" else ActQuantizer(bits, False)


ATTENTION_ATTR = "qlimit_attention"


def qlimit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with quantized matmul inputs; registered in transformers' `AttentionInterface` as "qlimit"."""
    quant: AttentionQuantizers | None = getattr(module, ATTENTION_ATTR, None)
    if quant is not None:
        query = first_token.quantize_queries(quant.query, query)
        key, value = first_token.quantize_keys(quant.key, key), first_token.quantize_keys(quant.value, value)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        probs = quant.probs(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("qlimit", qlimit_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register("qlimit", eager_mask)
