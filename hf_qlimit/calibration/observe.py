"""Activation-range calibration passes: quantizers record what a forward pass feeds them, then get their grid
by Lp search. Used by the pipeline for the blocks and for the quantizers outside them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..hf.surgery import quantized_modules


def observe(quantizers: list, forward_pass: Callable[[], Any], p: float) -> None:
    """Runs `forward_pass()` with the quantizers recording, then sets their ranges by Lp search."""
    for q in quantizers:
        q.observe()
    forward_pass()
    for q in quantizers:
        q.finish_observing(p)


class AllSeen(Exception):
    """Ends a calibration forward pass early: every quantizer it calibrates has seen this batch."""


@contextmanager
def stop_once_seen(quantizers: list) -> Iterator[set]:
    """Raises `AllSeen` as soon as each of `quantizers` has run on the current batch (clear the yielded set
    between batches): the rest of the model, an LM head's vocabulary-sized logits above all, is not needed."""
    seen: set[int] = set()

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        seen.add(id(module))
        if len(seen) == len(quantizers):
            raise AllSeen

    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def calibrate_outside_blocks(quantizers: list, forward_pass: Callable[[], Any], p: float) -> list:
    """Calibrates the activation quantizers outside the blocks that `forward_pass()` reaches; returns those it
    did not.

    Called once on the model prefix (e.g. OPT's project_in) and once on the whole quantized model for the task or
    LM head; what even the latter does not reach goes to `remove_input_quantizers`.
    """
    for q in quantizers:
        q.observe()
    forward_pass()
    pending = []
    for q in quantizers:
        if q.has_observed:
            q.finish_observing(p)
        else:
            q.stop_observing()
            pending.append(q)
    return pending


def remove_input_quantizers(model: nn.Module, unused: list) -> list[str]:
    """Removes the input quantizers among `unused` (never reached by a whole-model pass: they guard a module the
    forward pass does not use, e.g. an unused pooler) rather than leave them uncalibrated; returns the names of
    the modules that lost theirs, whose activations are no longer quantized."""
    unused_ids = {id(q) for q in unused}
    removed = []
    for name, module in quantized_modules(model):
        if getattr(module, "input_quantizer", None) is not None and id(module.input_quantizer) in unused_ids:
            module.remove_input_quantizer()
            removed.append(name)
    return removed
