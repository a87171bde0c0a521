"""Switching a model's quantizers on and off during calibration: the FP pass and the quantized pass of a block
(or of the whole model) run through the same converted modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..quantizers import ActQuantizer, WeightQuantizer


def act_quantizers(module: nn.Module) -> Iterator[ActQuantizer]:
    """Every activation quantizer inside `module`."""
    return (m for m in module.modules() if isinstance(m, ActQuantizer))


@contextmanager
def quant_state(module: nn.Module, weights: bool, acts: bool) -> Iterator[None]:
    """Temporarily switch weight and activation quantization inside `module` on or off."""
    quantizers = [m for m in module.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    saved = [q.enabled for q in quantizers]
    for q in quantizers:
        q.set_enabled(weights if isinstance(q, WeightQuantizer) else acts)
    try:
        yield
    finally:
        for q, enabled in zip(quantizers, saved):
            q.set_enabled(enabled)
