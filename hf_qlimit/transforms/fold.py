"""Folding an explicit per-channel op into the norm in front of it (pre-LN models: OPT, Llama).

When a norm's output feeds only the Linears of one group, (norm(x) − δ) / s is a norm with γ' = γ / s and
β' = (β − δ) / s: the op disappears and the checkpoint is an ordinary model with changed norm and Linear weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .input_op import InputTransform


@torch.no_grad()
def fold_into_norm(norm: nn.Module, ops: list[InputTransform]) -> None:
    """Moves the ops' shift/smooth (all equal within the group) into `norm`'s weight and bias."""
    first = ops[0]
    shift, smooth = first.shift, first.smooth
    if shift is None and smooth is None:
        return
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if weight is None:
        raise ValueError(f"Cannot fold a channel scale into {type(norm).__name__}: it has no weight.")
    if shift is not None and bias is None:
        raise ValueError(f"Cannot fold a channel shift into {type(norm).__name__}: it has no bias (RMSNorm).")
    s = smooth if smooth is not None else torch.ones_like(weight)
    if bias is not None:
        bias.copy_((bias - (shift if shift is not None else 0.0)) / s)
    weight.div_(s)
    for op in ops:
        op.clear_channel_ops()
