"""Mixed precision: measure how much quantizing each block Linear costs (`sensitivity`, cached on disk by
`cache`), then choose its bits with an integer program under the size and BOPs budgets (`allocation`).

The pipeline calls `allocate_bits` on the FP model when `config.bit_candidates` is set.
"""

from .allocation import (
    Allocation,
    LayerCost,
    allocate_bits,
    block_linears,
    budget_limits,
    budget_usage,
    layer_costs,
    solve_allocation,
)
from .cache import cached_sensitivity
from .sensitivity import Sensitivity, measure_sensitivity

__all__ = [
    "Allocation",
    "LayerCost",
    "Sensitivity",
    "allocate_bits",
    "block_linears",
    "budget_limits",
    "budget_usage",
    "cached_sensitivity",
    "layer_costs",
    "measure_sensitivity",
    "solve_allocation",
]
