"""Where a block's rounding starts: round-to-nearest of the FP weight, or GPTQ's error-compensated weight.

With `weight_init="gptq"` every quantized Linear of the block gets the Hessian H = 2/N Σ xᵀx of its inputs on the
quantized stream (the block's weights and activations in FP, as GPTQ collects it), and the compensated weight
w̃ on its own grid. Round-to-nearest of w̃ is GPTQ's result; AdaRound starts from frac(w̃ / s), so 0 iterations
give GPTQ's codes and reconstruction refines them. The pipeline hands each w̃ to the rounding that starts from it
(calibration/rounding.py), or rounds it to nearest itself with `method="rtn"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from ..hf.surgery import quantized_modules
from ..nn.modules import QuantLinear
from ..quantizers.gptq import HessianAccumulator
from .block_inputs import BlockInputs, Stream, call_block
from .quant_state import quant_state

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class WeightStart:
    """Where one weight's rounding starts instead of its FP weight: GPTQ's compensated `weight` w̃, and the
    `margin` AdaRound's h start from the decision round-to-nearest of w̃ takes (None: at frac(w̃ / s))."""

    weight: torch.Tensor
    margin: float | None = None


@torch.no_grad()
def block_hessians(
    block: nn.Module, hidden: Stream, inputs: BlockInputs, token_mask: list[torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Name -> H of the inputs of every quantized Linear of `block`, padding left out."""
    linears = {n: m for n, m in quantized_modules(block) if isinstance(m, QuantLinear)}
    accumulators = {n: HessianAccumulator(m.in_features, device) for n, m in linears.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(module: nn.Module, args: tuple) -> None:
            x, mask = args[0], current["mask"]
            if x.shape[:-1] != mask.shape:  # OPT's FFN sees (batch · length, features): flatten the mask alike
                mask = mask.reshape(-1) if x.shape[:-1].numel() == mask.numel() else None
            # None: not the tokens (DeBERTa's query/key projections also read the relative position table)
            accumulators[name].add(x, mask)

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with quant_state(block, weights=False, acts=False):
            for j, h in enumerate(hidden):
                current["mask"] = token_mask[j].to(device)
                call_block(block, h, inputs, j, device)
    finally:
        for handle in handles:
            handle.remove()
    return {n: acc.hessian for n, acc in accumulators.items()}


def init_block_weights(
    block: nn.Module,
    hidden: Stream,
    inputs: BlockInputs,
    token_mask: list[torch.Tensor],
    device: torch.device,
    method: str,
    margin: float | None = None,
    act_order: bool = False,
) -> dict[str, WeightStart]:
    """Name (in `block`) -> where the rounding of each quantized Linear starts, by `method` (validated with the
    config); "rtn" gives none: each starts at its FP weight. Call after the grids are set and before the FP
    weights are released."""
    if method == "rtn":
        return {}
    hessians = block_hessians(block, hidden, inputs, token_mask, device)
    starts = {}
    for name, module in quantized_modules(block):
        if name not in hessians:  # fused experts: each expert reads its own tokens, inside the experts' forward
            logger.warning_once(
                f"GPTQ's start covers Linears only: the {type(module).__name__}s of fused MoE experts start from "
                "round-to-nearest."
            )
            continue
        w = module.weight_quantizer.compensated_weight(module.weight, hessians.pop(name), act_order=act_order)
        starts[name] = WeightStart(w, margin)
    return starts
