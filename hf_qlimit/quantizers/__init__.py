"""Quantizer primitives: affine grids, Lp range search, AdaRound weights and LSQ activations."""

from .adaround import WeightQuantizer, beta_schedule
from .fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range
from .lsq import ActQuantizer
from .range_search import search_activation_range, search_weight_range

__all__ = [
    "ActQuantizer",
    "WeightQuantizer",
    "beta_schedule",
    "dequantize_codes",
    "quantize_codes",
    "scale_zero_from_range",
    "search_activation_range",
    "search_weight_range",
]
