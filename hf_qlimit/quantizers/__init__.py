"""Quantizer primitives: fake quantization, Lp range search, AdaRound weights and LSQ activations."""

from .adaround import WeightQuantizer, beta_schedule
from .fake_quant import fake_quantize, round_ste, scale_zero_from_range
from .lsq import ActQuantizer
from .range_search import search_activation_range, search_weight_range

__all__ = [
    "ActQuantizer",
    "WeightQuantizer",
    "beta_schedule",
    "fake_quantize",
    "round_ste",
    "scale_zero_from_range",
    "search_activation_range",
    "search_weight_range",
]
