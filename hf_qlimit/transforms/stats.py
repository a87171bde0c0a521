"""Per-channel statistics of Linear inputs on calibration data (padding tokens left out)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..forward import to_device


@torch.no_grad()
def channel_ranges(
    model: nn.Module,
    linears: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    outputs: frozenset[str] = frozenset(),
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (per-channel min, per-channel max) of the input of each module in `linears`, over real tokens; of
    its output for the names in `outputs` (a norm, whose output an MoE block flattens before its readers see it)."""
    ranges: dict[str, list[torch.Tensor]] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
            x = (args[0] if output is None else output).detach()
            token_mask = mask.get("now")
            if token_mask is not None and x.dim() == 3 and x.shape[:2] == token_mask.shape:
                x = x[token_mask]
            x = x.reshape(-1, x.shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            if name in ranges:
                ranges[name] = [torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)]
            else:
                ranges[name] = [lo, hi]

        return record

    handles = [
        module.register_forward_hook(hook(name)) if name in outputs else module.register_forward_pre_hook(hook(name))
        for name, module in linears.items()
    ]
    try:
        for batch in batches:
            batch = to_device(batch, device)
            mask["now"] = batch["attention_mask"].bool() if "attention_mask" in batch else None
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(ranges))
    if missing:
        raise RuntimeError(f"The calibration pass never reached {missing[:3]}: no statistics for their inputs.")
    return {name: (lo, hi) for name, (lo, hi) in ranges.items()}
