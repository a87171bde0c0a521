"""Capture what the first block receives (hidden states, masks, position embeddings...) for every sample.

Like GPTQ's "Catcher": a pre-hook on block 0 records its arguments and stops the forward pass, so the model
prefix runs once. Arguments whose first dimension is the batch are stored per sample, so reconstruction can
draw random mini-batches; the others (shared position embeddings, flags) are kept once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


class _Stop(Exception):
    pass


class BlockInputs:
    """Per-sample extra arguments of a block (everything but the hidden states)."""

    def __init__(self, leaves: list[Any], batched: list[bool], spec: Any) -> None:
        self.leaves, self.batched, self.spec = leaves, batched, spec

    def select(self, index: torch.Tensor | slice, device: torch.device) -> tuple[tuple, dict]:
        leaves = [
            (leaf[index] if batched else leaf).to(device) if isinstance(leaf, torch.Tensor) else leaf
            for leaf, batched in zip(self.leaves, self.batched)
        ]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return args, kwargs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, BlockInputs]:
    """Runs the model prefix on each batch; returns the block's hidden-state inputs (on CPU) and other arguments."""
    records: list[tuple[torch.Tensor, list, Any]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        leaves, spec = tree_flatten((tuple(args[1:]), kwargs))
        records.append((hidden.detach().cpu(), leaves, spec))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(records) != len(batches):
        raise RuntimeError("The first block was not called by the model's forward; the adapter points at the wrong module.")

    hidden = torch.cat([r[0] for r in records])
    spec = records[0][2]
    leaves, batched = [], []
    for i, leaf in enumerate(records[0][1]):
        per_batch = [r[1][i] for r in records]
        is_batched = isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and all(
            t.shape[0] == r[0].shape[0] for t, r in zip(per_batch, records)
        )
        if is_batched:
            leaves.append(torch.cat([t.detach().cpu() for t in per_batch]))
        else:
            leaves.append(leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf)
        batched.append(is_batched)
    return hidden, BlockInputs(leaves, batched, spec)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns, whether alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The block's outputs for all samples, computed in mini-batches and returned on CPU."""
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        index = slice(start, start + batch_size)
        args, kwargs = inputs.select(index, device)
        outs.append(block_output(block(hidden[index].to(device), *args, **kwargs)).cpu())
    return torch.cat(outs)
