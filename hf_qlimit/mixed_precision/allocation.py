"""Bits per block Linear from the measured sensitivities: an integer program (`scipy.optimize.milp`) that
minimises the estimated loss within the size, average-bits and BOPs budgets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn
from transformers.utils import logging

from ..config import QLimitConfig
from ..hf.layer_kinds import LINEAR_KINDS, matmul_shape
from ..models.base import ArchitectureAdapter, matches
from ..nn.modules import QuantLinear
from .cache import cached_sensitivity
from .sensitivity import Sensitivity

logger = logging.get_logger(__name__)

_FP_ACT_BITS = 32  # activation bits of a weight-only layer in the BOPs count (float32 inputs)


@dataclass
class LayerCost:
    """What one block Linear costs at each candidate bit-width, for the budget constraints."""

    params: int  # also the MACs per token: a Linear does one multiply-accumulate per weight
    act_bits: int
    packed_bytes: dict[int, int]  # bits -> bytes of the packed codes plus scales and zero points


@dataclass
class Allocation:
    bits: dict[str, int]  # chosen bits of the Linears the solver was free to set
    usage: dict[str, float]  # budget -> what the chosen bits use (pinned Linears included)
    allowed: dict[str, float]
    predicted_loss: float


def allocate_bits(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: list[dict[str, torch.Tensor]],
    config: QLimitConfig,
    device: torch.device,
    pairwise: bool = True,
) -> dict[str, int]:
    """Module name -> weight bits for every block Linear, minimising the estimated loss within the budget.

    Call on the FP model, before conversion; merge the result into `config.module_bits`. Linears that
    `config.module_bits` already names keep their bits, count in the budget, and are left out of the result.
    """
    if not config.bit_candidates:
        raise ValueError("allocate_bits needs bit_candidates, e.g. QLimitConfig(bit_candidates=[2, 4, 8], avg_bits=3).")
    specs = block_linears(model, adapter, config)
    if not specs:
        raise ValueError("The model has no Linear inside its blocks to allocate bits to.")
    fixed = {n: spec["w"] for n, spec in specs.items() if any(matches(n, p) for p in config.module_bits)}
    costs = layer_costs(model, specs, config)
    free = [n for n in specs if n not in fixed]
    if len(config.bit_candidates) == 1 or not free:  # nothing to choose: the budget check alone matters
        sens = Sensitivity({n: dict.fromkeys(config.bit_candidates, 0.0) for n in free}, {})
    else:
        sens = cached_sensitivity(model, adapter, batches, config, device, free, pairwise)
    alloc = solve_allocation(sens, costs, config, fixed)
    _log_summary(alloc, sens, costs, fixed)
    return alloc.bits


def block_linears(model: nn.Module, adapter: ArchitectureAdapter, config: QLimitConfig) -> dict[str, dict[str, Any]]:
    """Name -> layer-config spec of every Linear (or Conv1D) inside the blocks that quantization converts."""
    prefix = adapter.blocks_name(model) + "."
    plan = adapter.layer_config(model, config)
    if any(spec["kind"] == "experts" for spec in plan.values()):
        logger.warning_once("Mixed precision allocates Linears only: fused MoE experts keep `weight_bits`.")
    return {name: spec for name, spec in plan.items() if spec["kind"] in LINEAR_KINDS and name.startswith(prefix)}


def layer_costs(model: nn.Module, specs: dict[str, dict[str, Any]], config: QLimitConfig) -> dict[str, LayerCost]:
    costs = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        out_features, in_features = matmul_shape(linear)  # a Conv1D stores [in, out]
        packed = {}
        for bits in sorted(set(config.bit_candidates or []) | {spec["w"]}):
            # Count exactly what a frozen QuantLinear saves (codes, scales, zero points), built on meta: no memory.
            with torch.device("meta"):
                q = QuantLinear(
                    in_features,
                    out_features,
                    False,
                    bits,
                    None,
                    config.group_size,
                    config.weight_sym,
                    frozen=True,
                )
            packed[bits] = sum(t.numel() * t.element_size() for t in q.state_dict().values())
        costs[name] = LayerCost(in_features * out_features, spec.get("a") or _FP_ACT_BITS, packed)
    return costs


def budget_limits(costs: dict[str, LayerCost], config: QLimitConfig) -> dict[str, float]:
    """Budget name -> allowed total: "bits" (Σ params·bits), "bytes" and "bops"."""
    # Totals are integers; the epsilon absorbs float noise such as 2.1 * n = 2.0999...
    bits = None if config.avg_bits is None else np.floor(config.avg_bits * sum(c.params for c in costs.values()) + 1e-6)
    limits = {"bits": bits, "bytes": config.size_budget_bytes, "bops": config.bops_budget}
    return {key: float(value) for key, value in limits.items() if value is not None}


def _layer_usage(cost: LayerCost, bits: int) -> dict[str, float]:
    return {"bits": cost.params * bits, "bytes": cost.packed_bytes[bits], "bops": cost.params * bits * cost.act_bits}


def budget_usage(costs: dict[str, LayerCost], bits: dict[str, int]) -> dict[str, float]:
    """Totals of every budget for a full assignment of bits; "avg_bits" is "bits" over the parameter count."""
    usage = {
        key: float(sum(_layer_usage(c, bits[n])[key] for n, c in costs.items())) for key in ("bits", "bytes", "bops")
    }
    usage["avg_bits"] = usage["bits"] / max(1, sum(c.params for c in costs.values()))
    return usage


def solve_allocation(
    sens: Sensitivity, costs: dict[str, LayerCost], config: QLimitConfig, fixed: dict[str, int] | None = None
) -> Allocation:
    """One candidate per free Linear minimising Σ Δ_l(b_l) + Σ positive pair excesses, within every budget."""
    fixed = fixed or {}
    free = [n for n in costs if n not in fixed]
    limits = budget_limits(costs, config)
    if not limits:
        raise ValueError("Mixed precision needs a budget: set `avg_bits` or `size_budget_bytes`.")
    floor = _lowest_usage(costs, config, free, fixed, limits)
    if not free:
        return Allocation({}, floor, limits, 0.0)
    problem = _BitsProblem.build(sens, costs, config.bit_candidates, free, fixed, limits)
    bits, usage = problem.solve(costs, fixed, limits)
    return Allocation(bits, usage, limits, problem.predicted_loss(sens, bits))


def _lowest_usage(
    costs: dict[str, LayerCost], config: QLimitConfig, free: list[str], fixed: dict[str, int], limits: dict[str, float]
) -> dict[str, float]:
    """The usage with every free Linear at the lowest candidate; an error if even that exceeds a budget."""
    low = config.bit_candidates[0]
    floor = budget_usage(costs, {**{n: low for n in free}, **fixed})
    requested = {
        "bits": ("avg_bits", config.avg_bits),
        "bytes": ("size_budget_bytes", config.size_budget_bytes),
        "bops": ("bops_budget", config.bops_budget),
    }
    for key, allowed in limits.items():
        if floor[key] > allowed:
            (name, value), minimum = requested[key], floor["avg_bits" if key == "bits" else key]
            raise ValueError(
                f"{name}={value:.6g} cannot be met: with every block Linear at {low} bits (the lowest "
                f"candidate, scales and zero points included) it is already {minimum:.6g}. The minimum achievable "
                f"{name} is {minimum:.6g}."
            )
    return floor


@dataclass
class _BitsProblem:
    """The ILP: binary x[l, b] (Linear l at candidate b, one b per Linear), then y_k ∈ [0, 1] for each positive
    pair excess, paid when both Linears are at the lowest bits; rows (lower ≤ matrix · [x, y] ≤ upper)."""

    candidates: list[int]
    free: list[str]
    col: dict[tuple[str, int], int]  # (Linear, bits) -> column of x
    pairs: list[tuple[str, str, float]]
    cost: np.ndarray
    matrix: np.ndarray
    lower: list[float]
    upper: list[float]
    budget_rows: dict[str, int]  # budget -> its row

    @classmethod
    def build(
        cls,
        sens: Sensitivity,
        costs: dict[str, LayerCost],
        candidates: list[int],
        free: list[str],
        fixed: dict[str, int],
        limits: dict[str, float],
    ) -> _BitsProblem:
        col = {(n, b): i for i, (n, b) in enumerate(itertools.product(free, candidates))}
        pairs = [(a, b, v) for (a, b), v in sens.pairs.items() if v > 0 and a in free and b in free]
        nx, ny = len(col), len(pairs)
        cost = np.zeros(nx + ny)
        for (n, b), i in col.items():
            cost[i] = sens.singles[n][b]
        cost[nx:] = [v for _, _, v in pairs]
        cost /= max(np.abs(cost).max(initial=0.0), 1e-30)  # O(1) objective, so HiGHS's absolute gap is moot

        fixed_use = budget_usage({n: costs[n] for n in fixed}, fixed)
        rows = [({col[n, b]: 1 for b in candidates}, 1, 1) for n in free]  # (coefficients, lower, upper) of each row
        budget_rows = {key: len(rows) + k for k, key in enumerate(limits)}
        for key, allowed in limits.items():
            usage = {i: _layer_usage(costs[n], b)[key] for (n, b), i in col.items()}
            rows.append((usage, -np.inf, allowed - fixed_use[key]))
        # y_k ≥ x[a,low] + x[b,low] − 1: pair k's excess is paid when both are at the lowest bits
        low = candidates[0]
        rows += [({nx + k: 1, col[a, low]: -1, col[b, low]: -1}, -1, np.inf) for k, (a, b, _) in enumerate(pairs)]
        matrix = np.zeros((len(rows), nx + ny))
        for r, (entries, _, _) in enumerate(rows):
            matrix[r, list(entries)] = list(entries.values())
        lower, upper = [r[1] for r in rows], [r[2] for r in rows]
        return cls(candidates, free, col, pairs, cost, matrix, lower, upper, budget_rows)

    def solve(
        self, costs: dict[str, LayerCost], fixed: dict[str, int], limits: dict[str, float]
    ) -> tuple[dict[str, int], dict[str, float]]:
        """The chosen bits of the free Linears and the budgets' usage with them."""
        nx, ny = len(self.col), len(self.pairs)
        integrality = np.r_[np.ones(nx), np.zeros(ny)]  # y is integral whenever x is
        # Integer coefficients: retry tighter if HiGHS's tolerances let the rounded solution overshoot.
        for _ in range(3):
            res = milp(
                self.cost,
                constraints=LinearConstraint(self.matrix, self.lower, self.upper),
                integrality=integrality,
                bounds=Bounds(0, 1),
                options={"time_limit": 120.0},
            )
            if res.x is None:
                raise RuntimeError(f"The bit allocation ILP found no solution: {res.message}")
            bits = {n: next(b for b in self.candidates if res.x[self.col[n, b]] > 0.5) for n in self.free}
            usage = budget_usage(costs, {**bits, **fixed})
            over = {key: usage[key] - allowed for key, allowed in limits.items() if usage[key] > allowed}
            if not over:
                return bits, usage
            for key, excess in over.items():
                self.upper[self.budget_rows[key]] -= excess
        raise RuntimeError(f"The bit allocation ILP kept exceeding the budget by {over}.")

    def predicted_loss(self, sens: Sensitivity, bits: dict[str, int]) -> float:
        """Σ Δ_l(b_l) plus the positive pair excesses of the pairs both at the lowest bits."""
        low = self.candidates[0]
        predicted = sum(sens.singles[n][b] for n, b in bits.items())
        return predicted + sum(v for a, b, v in self.pairs if bits[a] == bits[b] == low)


def _log_summary(alloc: Allocation, sens: Sensitivity, costs: dict[str, LayerCost], fixed: dict[str, int]) -> None:
    width = max(map(len, costs))
    lines = [
        f"Mixed precision over {len(costs)} block Linears:",
        f"{'module':<{width}}  bits  {'params':>9}  Δ(est. KL)",
    ]
    for name, cost in costs.items():
        bits = fixed.get(name) or alloc.bits[name]
        note = "pinned by module_bits" if name in fixed else f"{sens.singles[name][bits]:.3g}"
        lines.append(f"{name:<{width}}  {bits:>4}  {cost.params:>9}  {note}")
    params = sum(c.params for c in costs.values())
    for key, allowed in alloc.allowed.items():
        label, div = {"bits": ("avg_bits", params), "bytes": ("bytes", 1), "bops": ("BOPs/token", 1)}[key]
        lines.append(f"{label}: {alloc.usage[key] / div:.6g} used / {allowed / div:.6g} allowed")
    logger.info("\n".join(lines + [f"estimated KL increase per sample: {alloc.predicted_loss:.4g}"]))
