"""The model's block stacks as calibration meets them: found and verified by one FP forward, the decoder inputs an
encoder-decoder needs, and how each stack's blocks receive their arguments.

An encoder-decoder has two stacks, calibrated one after the other. The decoder's streams and arguments are
captured once the encoder is quantized: its blocks' cross-attention reads the quantized encoder's output, as
the deployed model's will. The FP weights of the embedding and encoder are gone by then, so the decoder's FP
targets start from the same (quantized) inputs as its quantized stream.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from ..forward import to_device
from ..models import BlockStack, find_stacks, verify_stacks
from ..models.discovery import remember_attention
from ..nn.attention_probe import AttentionCalls, record_attention_calls
from .block_inputs import (
    StackInputs,
    capture_block_inputs,
    capture_stack_inputs,
    record_block_arguments,
    same_arguments,
)
from .cache import ActivationCache, Stream

logger = logging.get_logger(__name__)

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """The verified stacks in forward order, and whether each stack's blocks all receive block 0's arguments."""

    stacks: tuple[BlockStack, ...]
    shared_arguments: tuple[bool, ...]
    attention: AttentionCalls  # the modules that call transformers' attention interface

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(s.prefix for s in self.stacks)

    def all_blocks(self) -> list[nn.Module]:
        return [block for stack in self.stacks for block in stack.blocks]


def add_decoder_inputs(model: nn.Module, batches: Batches) -> Batches:
    """An encoder-decoder's calibration batches with `decoder_input_ids`: each sample shifted right behind the
    decoder start token (teacher forcing on the calibration text), unless the batches carry them already."""
    config = model.config
    if not getattr(config, "is_encoder_decoder", False):
        return batches
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder without `decoder_start_token_id` in its config: set it "
            "(T5 uses the pad token) so calibration can build the decoder's inputs."
        )
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    out = []
    for batch in batches:
        if "decoder_input_ids" not in batch:
            ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad)
            shifted = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
            batch = {**batch, "decoder_input_ids": shifted}
        out.append(batch)
    return out


@torch.no_grad()
def discover_layout(model: nn.Module, batch: dict[str, torch.Tensor], where: torch.device) -> Layout:
    """One FP forward on `batch` (inputs on `where`) verifies the block stacks and compares the blocks'
    arguments."""
    guess = find_stacks(model)
    with record_attention_calls(model) as attention, ExitStack() as hooks:  # attention is "qlimit" meanwhile
        records = {s.name: hooks.enter_context(record_block_arguments(s.blocks)) for s in guess}
        stacks = verify_stacks(model, lambda: model(**to_device(batch, where), use_cache=False))
    remember_attention(model, attention.names)
    shared = tuple(same_arguments(records[s.name]) for s in stacks)
    for stack, same in zip(stacks, shared):
        if not same:
            logger.info(f"The blocks of {stack.name} receive different arguments: each is calibrated with its own.")
    return Layout(stacks, shared, attention)


def capture_first_stack(
    model: nn.Module, layout: Layout, batches: Batches, device: torch.device, cache: ActivationCache
) -> tuple[Stream, StackInputs]:
    """The first stack's FP input stream and its blocks' arguments (call with the quantizers off)."""
    blocks = layout.stacks[0].blocks
    if layout.shared_arguments[0]:  # the model prefix runs alone, once per batch
        hidden, inputs = capture_block_inputs(model, blocks[0], batches, device, cache)
        return hidden, StackInputs.shared(inputs, len(blocks))
    return capture_stack_inputs(model, blocks, batches, device, cache)
