"""Attention with quantized matmul inputs (Q·Kᵀ and P·V): the quantizers a block's attention module carries
and the eager attention function registered with transformers as "qlimit"."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import ActQuantizer, first_token
from ..quantizers.act_grids import Log2Quantizer, UnitQuantizer


class AttentionQuantizers(nn.Module):
    """Quantizers of the attention matmul inputs: Q and K for Q·Kᵀ, the probabilities P and V for P·V.

    The probabilities get `prob_bits` (default: `act_bits`) on a "uniform", "unit" or "log2" grid (`prob_grid`)."""

    def __init__(
        self, act_bits: int, act_sym: bool = False, prob_bits: int | None = None, prob_grid: str = "uniform"
    ) -> None:
        super().__init__()
        self.query = ActQuantizer(act_bits, act_sym)
        self.key = ActQuantizer(act_bits, act_sym)
        self.value = ActQuantizer(act_bits, act_sym)
        self.probs = _probability_quantizer(act_bits if prob_bits is None else prob_bits, prob_grid)


def _probability_quantizer(bits: int, grid: str) -> ActQuantizer:
    # Softmax outputs lie in [0, 1]: an asymmetric uniform grid wastes no code on negatives; "unit" fixes that grid
    # to all of [0, 1], so the large probabilities are never clipped; a log2 grid keeps the many small
    # probabilities apart instead of rounding them to 0.
    if grid == "log2":
        return Log2Quantizer(bits)
    return UnitQuantizer(bits) if grid == "unit" else ActQuantizer(bits, False)


ATTENTION_ATTR = "qlimit_attention"

# Keyword arguments the families pass to the attention function that their own eager functions ignore: the mask
# already holds them (sliding_window, is_causal, packed-sequence lengths), or they steer caches, outputs or flash
# kernels. Any other argument that is not None is refused: ignoring it could change the result silently.
IGNORED_KWARGS = frozenset(
    {
        "sliding_window",
        "is_causal",
        "position_ids",
        "cache_position",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
        "use_cache",
        "past_key_values",
        "cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "deterministic",
        "encoder_hidden_states",
    }
)


class AttentionCall(NamedTuple):
    """One call of `qlimit_attention_forward`: the calling module and the keyword arguments (not None) it passed
    that the function does not know."""

    module: nn.Module
    unknown: tuple[str, ...]


_CALLS: ContextVar[list[AttentionCall] | None] = ContextVar("qlimit_attention_calls", default=None)


@contextmanager
def attention_calls() -> Iterator[list[AttentionCall]]:
    """Every call of `qlimit_attention_forward` while the context is open, in order.

    Meanwhile a call with arguments the function does not know runs the family's own eager attention function
    (module-level `eager_attention_forward` of the module's modeling file) instead of raising, so that a probing
    forward pass stays exact; that module's attention quantizers are then not applied. It raises where the
    family has no such function."""
    calls: list[AttentionCall] = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def unknown_attention_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """The names in `kwargs` that `qlimit_attention_forward` does not know and would refuse."""
    return sorted(name for name, value in kwargs.items() if value is not None and name not in IGNORED_KWARGS)


def qlimit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with quantized matmul inputs; registered in transformers' `AttentionInterface` as "qlimit".

    Honours the extras of the families' own eager functions, in their order: `softcap` (Gemma 2: c·tanh(s/c) on
    the scaled scores), `position_bias` (T5, which passes `scaling=1`: added to the scores), then the mask, then
    an attention sink, one extra softmax logit per query whose probability is dropped: `sinks` as
    [batch, heads, queries, 1] (Inkling 2) or `s_aux` as one logit per head (gpt-oss). `scaling=None` means
    1/sqrt(head_dim). Another keyword argument that is not None and not in `IGNORED_KWARGS` raises (outside
    `attention_calls`)."""
    unknown = unknown_attention_kwargs(kwargs)
    calls = _CALLS.get()
    if calls is not None:
        calls.append(AttentionCall(module, tuple(unknown)))
    if unknown:
        extras = {"softcap": softcap, "position_bias": position_bias, "sinks": sinks, "s_aux": s_aux, **kwargs}
        eager = _family_eager(module) if calls is not None else None
        if eager is None:
            raise ValueError(
                f"{type(module).__name__} ({type(module).__module__}) passes {unknown} to the attention function; "
                'hf_qlimit\'s "qlimit" attention does not know how they change the result and refuses to drop '
                "them. Quantize this model with `quantize_attention=False`."
            )
        extras = {name: v for name, v in extras.items() if v is not None}
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extras)
    quant: AttentionQuantizers | None = getattr(module, ATTENTION_ATTR, None)
    if quant is not None:
        query = first_token.quantize_queries(quant.query, query)
        key, value = first_token.quantize_keys(quant.key, key), first_token.quantize_keys(quant.value, value)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = _softmax(scores, _sink_logits(sinks, s_aux, scores)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        probs = quant.probs(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _family_eager(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _sink_logits(sinks: torch.Tensor | None, s_aux: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
    if sinks is not None and s_aux is not None:
        raise ValueError("The attention function got both `sinks` and `s_aux`; a family passes one or the other.")
    if s_aux is not None:  # one logit per head
        sinks = s_aux.reshape(1, -1, 1, 1)
    return None if sinks is None else sinks.expand(*scores.shape[:-1], 1)


def _softmax(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    # In float32, as the families' eager functions do; a sink takes its share of the mass and is then dropped.
    if sink is None:
        return F.softmax(scores, dim=-1, dtype=torch.float32)
    combined = torch.cat([scores.float(), sink.float()], dim=-1)
    return F.softmax(combined, dim=-1)[..., :-1]


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("qlimit", qlimit_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register("qlimit", eager_mask)
