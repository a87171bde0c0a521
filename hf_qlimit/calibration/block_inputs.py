"""Capture what the blocks receive (hidden states, masks, position embeddings...) for every batch.

Like GPTQ's "Catcher": a pre-hook on block 0 records its arguments and stops the forward pass, so the model
prefix runs once. That serves every block when all of them receive block 0's other arguments (BERT, Llama).
Where they differ (Gemma 2/3 and ModernBERT alternate sliding and global masks, T5's later blocks receive the
position bias block 0 computed), one FP forward per batch records each block's own arguments, each tensor held
once however many blocks share it. Calibration batches group samples of similar length and are trimmed to their
longest one, so short sentences do not pay for the longest sample's padding; every stream is a list with one
tensor per batch, and the blocks' other arguments are kept per batch too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..forward import block_output, map_tensors, to_device
from .cache import ActivationCache, Stream  # a Stream holds one (batch, length, hidden) CPU tensor per batch


class _Stop(Exception):
    pass


def select_rows(obj: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """The `rows` of every (batch, ...) tensor in an argument structure. 1-D tensors (cache positions) and
    tensors broadcast over the batch (dim 0 of 1) are kept whole."""
    if batch_size == 1:
        return obj

    def pick(x: Any) -> Any:
        return x[rows] if x.dim() >= 2 and x.shape[0] == batch_size else x

    return map_tensors(pick, obj)


class BlockInputs:
    """The extra positional and keyword arguments (everything but the hidden states) of each batch."""

    def __init__(self, per_batch: list[tuple[tuple, dict]], sizes: list[int]) -> None:
        self.per_batch, self.sizes = per_batch, sizes  # sizes: samples in each batch

    def get(self, batch: int, device: torch.device, rows: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """Batch `batch`'s arguments; `rows`: those of these samples only."""
        args = self.per_batch[batch]
        if rows is not None:
            args = select_rows(args, rows, self.sizes[batch])
        return to_device(args, device)


class StackInputs:
    """Each block's `BlockInputs`; blocks that receive the same arguments share one object."""

    def __init__(self, per_block: list[BlockInputs]) -> None:
        self.per_block = per_block

    @classmethod
    def shared(cls, inputs: BlockInputs, blocks: int) -> StackInputs:
        return cls([inputs] * blocks)

    def for_block(self, index: int) -> BlockInputs:
        return self.per_block[index]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[tuple, dict]]:
    kwargs = dict(kwargs)
    states = args[0] if args else kwargs.pop("hidden_states")
    return states, (tuple(args[1:]), kwargs)


@contextmanager
def record_block_arguments(blocks: nn.ModuleList) -> Iterator[list[tuple[tuple, dict]]]:
    """Records what the blocks receive besides the hidden states, one entry per call, while the context is open."""
    seen: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        seen.append(_split_call(args, kwargs)[1])

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def same_arguments(calls: list[tuple[tuple, dict]]) -> bool:
    """Whether every recorded call received the first call's arguments (same tensors, or equal ones)."""
    return all(_same(calls[0], other) for other in calls[1:])


@torch.no_grad()
def capture_stack_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    cache: ActivationCache | None = None,
) -> tuple[Stream, StackInputs]:
    """One whole forward pass per batch: block 0's hidden-state inputs, and every block's other arguments
    (on CPU, a tensor that several blocks receive stored once)."""
    hidden = (cache or ActivationCache()).stream()
    per_block: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    sizes: list[int] = []
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, kept alive; CPU copy)

    def to_cpu(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in memo:
            memo[id(x)] = (x, x.to("cpu"))
        return memo[id(x)][1]

    def hook_for(index: int):
        def hook(module, args, kwargs):
            states, rest = _split_call(args, kwargs)
            if index == 0:
                hidden.append(states)
                sizes.append(states.shape[0])
            per_block[index].append(map_tensors(to_cpu, rest))

        return hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            memo.clear()
            model(**to_device(batch, device), use_cache=False)
    finally:
        handles = [h.remove() for h in handles]
    if any(len(calls) != len(batches) for calls in per_block):
        raise RuntimeError("The model's forward did not call every block once per batch.")
    return hidden, StackInputs([BlockInputs(calls, sizes) for calls in per_block])


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    cache: ActivationCache | None = None,
) -> tuple[Stream, BlockInputs]:
    """Runs the model prefix on each batch; returns the block's hidden-state inputs and its other arguments."""
    hidden = (cache or ActivationCache()).stream()
    extra: list[tuple[tuple, dict]] = []
    sizes: list[int] = []

    def hook(module, args, kwargs):
        states, rest = _split_call(args, kwargs)
        hidden.append(states)
        sizes.append(states.shape[0])
        extra.append(to_device(rest, torch.device("cpu")))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**to_device(batch, device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise RuntimeError(
            "The first block was not called by the model's forward; the adapter points at the wrong module."
        )
    return hidden, BlockInputs(extra, sizes)


def call_block(
    block: nn.Module,
    hidden: torch.Tensor,
    inputs: BlockInputs,
    batch: int,
    device: torch.device,
    rows: torch.Tensor | None = None,
):
    """The block's output on batch `batch`; `rows`: on those samples of it only, which `hidden` then holds."""
    args, kwargs = inputs.get(batch, device, rows)
    return block_output(block(hidden.to(device), *args, **kwargs))


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: Stream, inputs: BlockInputs, device: torch.device, cache: ActivationCache | None = None
) -> Stream:
    """The block's outputs for every batch, on CPU."""
    return (cache or ActivationCache()).stream(call_block(block, h, inputs, j, device) for j, h in enumerate(hidden))


@torch.no_grad()
def prefix_modules(
    model: nn.Module, first_block: nn.Module, batch: dict[str, torch.Tensor], input_device: torch.device
) -> list[str]:
    """Names of the modules the forward pass calls before the first block (embeddings, rotary, project_in)."""
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for m in first_block.modules()}
    seen: dict[str, None] = {}

    def record(module, args):
        if id(module) not in inside:
            seen[names[id(module)]] = None

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if id(m) not in inside]
    try:
        # the model as it is now: accelerate's hooks move a dispatched model's inputs themselves
        capture_block_inputs(model, first_block, [batch], input_device)
    finally:
        for handle in handles:
            handle.remove()
    return list(seen)


def modules_outside_blocks(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Modules outside the blocks (final norm, head...): materialized for the last whole-model pass. `prefixes`:
    "name." of each block stack."""
    return [n for n, _ in model.named_modules() if not n.startswith(prefixes) and n + "." not in prefixes]
