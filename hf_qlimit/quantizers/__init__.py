"""Quantizer primitives: affine grids, Lp range search, AdaRound weights, LSQ activations, GPTQ-compensated rounding."""

from .adaround import AdaRoundState, beta_schedule, hardened_fraction
from .fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range
from .gptq import HessianAccumulator, gptq_compensated_weight, search_weight_range_output
from .lsq import ActQuantizer
from .range_search import search_activation_range, search_weight_range
from .signround import SignRoundState
from .weight import WeightQuantizer

__all__ = [
    "ActQuantizer",
    "AdaRoundState",
    "HessianAccumulator",
    "SignRoundState",
    "WeightQuantizer",
    "beta_schedule",
    "dequantize_codes",
    "gptq_compensated_weight",
    "hardened_fraction",
    "quantize_codes",
    "scale_zero_from_range",
    "search_activation_range",
    "search_weight_range",
    "search_weight_range_output",
]
