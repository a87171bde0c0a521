"""Quantizer primitives: affine grids, Lp range search, AdaRound weights, LSQ activations, GPTQ-compensated rounding."""

from .adaround import WeightQuantizer, beta_schedule, hardened_fraction
from .fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range
from .gptq import HessianAccumulator, gptq_compensated_weight, search_weight_range_output
from .lsq import ActQuantizer
from .range_search import search_activation_range, search_weight_range

__all__ = [
    "ActQuantizer",
    "HessianAccumulator",
    "WeightQuantizer",
    "beta_schedule",
    "hardened_fraction",
    "dequantize_codes",
    "gptq_compensated_weight",
    "quantize_codes",
    "scale_zero_from_range",
    "search_activation_range",
    "search_weight_range",
    "search_weight_range_output",
]
