"""The first token of each sequence kept out of activation quantization (`act_fp_first_token`).

Decoder LMs park massive activations on the token at position 0, the attention sink: some Linear inputs are
hundreds of times larger there than on any other token (figures in docs/results/language-modeling.md, "W4A8: the
attention sink and the probabilities"), so a static per-tensor grid either wipes out every other token or clips
the sink. PrefixQuant (Chen et al., 2024) prefills such tokens in full precision and keeps their K/V in
the cache, after which static per-tensor grids work. Here: while a decoder block runs, its position ids say
which tokens are at position 0; Linear inputs and queries of those tokens pass unquantized and key/value index 0
(the cache's first entry) does too. Calibration does not see them, so the grids fit the other tokens.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import nn

from .lsq import ActQuantizer


class _Block(NamedTuple):
    """Set while a hooked block runs: which tokens are at position 0 (None when this call has none, e.g. a
    decoding step, whose keys and values still start with the cached position 0)."""

    first: torch.Tensor | None


_BLOCK: ContextVar[_Block | None] = ContextVar("qlimit_first_token", default=None)
_HOOKED = "_qlimit_first_token_hooks"


def _enter(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs.get("cache_position")
    if positions is None:
        raise ValueError(
            "act_fp_first_token needs the blocks' `position_ids` (or `cache_position`) to find position 0, and "
            f"{type(block).__name__} received neither. It applies to decoder LMs."
        )
    first = positions == 0
    block.__dict__["_qlimit_first_token"] = _BLOCK.set(_Block(first if bool(first.any()) else None))


def _exit(block: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    token = block.__dict__.pop("_qlimit_first_token", None)
    if token is not None:
        _BLOCK.reset(token)


def hook_blocks(blocks: nn.ModuleList) -> None:
    """Marks position 0 while each block runs (once per block, however often it is converted)."""
    for block in blocks:
        if not block.__dict__.get(_HOOKED):
            block.register_forward_pre_hook(_enter, with_kwargs=True)
            block.register_forward_hook(_exit, with_kwargs=True, always_call=True)
            block.__dict__[_HOOKED] = True


def _quantize(quantizer: ActQuantizer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return quantizer(x)
    if quantizer.observing:  # the grid is fitted to the other tokens
        quantizer(x.masked_select(~keep))
        return x
    return torch.where(keep, x, quantizer(x))


def _first(rows: int, tokens: int) -> torch.Tensor | None:
    """(rows, tokens) True at position 0; None outside a hooked block, when no token of this call is at position
    0, or for another number of tokens. Position ids may come as one row for the whole batch."""
    block = _BLOCK.get()
    first = None if block is None else block.first
    if first is None or first.dim() != 2 or first.shape[-1] != tokens or first.shape[0] not in (1, rows):
        return None
    return first.expand(rows, tokens)


def quantize_tokens(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """A Linear input (batch, tokens, features), or (batch · tokens, features) as OPT's FFN flattens it, its
    position-0 tokens kept."""
    first = None
    if x.dim() == 3:
        first = _first(x.shape[0], x.shape[1])
    elif x.dim() == 2 and (block := _BLOCK.get()) is not None and block.first is not None:
        tokens = block.first.shape[-1]
        first = _first(x.shape[0] // tokens, tokens) if x.shape[0] % tokens == 0 else None
        first = None if first is None else first.reshape(-1)
    return _quantize(quantizer, x, None if first is None else first.unsqueeze(-1))


def quantize_queries(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Queries (batch, heads, tokens, dim), those at position 0 kept."""
    first = _first(x.shape[0], x.shape[2]) if x.dim() == 4 else None
    return _quantize(quantizer, x, None if first is None else first[:, None, :, None])


def quantize_keys(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Keys or values (batch, heads, cached + new tokens, dim): the cache's first entry, position 0, kept."""
    if _BLOCK.get() is None or x.dim() != 4:
        return quantizer(x)
    keep = torch.zeros(x.shape[2], dtype=torch.bool, device=x.device)
    keep[0] = True
    return _quantize(quantizer, x, keep[:, None])
