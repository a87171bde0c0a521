"""Mixed precision: measure how much quantizing each block Linear costs, then choose its bits with an ILP.

Sensitivity (BRECQ / Q-Limit): Δ_l(b) = ½ Σ_tokens Σ_j F_j (ΔW_l(b) x)_j², ΔW the round-to-nearest error on the
Lp-searched grid and F the diagonal Fisher of the FP model's own output distribution, i.e. the Hessian of
KL(FP ‖ perturbed) at the FP point: Σ_c p_c (∇ log p_c)², exact for few classes, one sampled label per position
otherwise. Squared KL gradients at one perturbed model would need an arbitrary choice of the perturbation's bits;
this needs none, and Δ estimates the KL itself, so all terms share one unit.

Interactions (BRECQ's reason for block reconstruction): for each pair of Linears of a block, the excess of
quantizing both at the lowest candidate over each alone, as Fisher-weighted error at the block output; only that
corner, where interactions are largest, on the first `_PAIR_SAMPLES` samples. Only positive excesses enter the
ILP: a cancellation is fragile (reconstruction changes the rounding) and the solver would chase it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..calibration.block_inputs import block_output, to_device
from ..config import QLimitConfig
from ..models.base import ArchitectureAdapter, matches
from ..nn.modules import QuantLinear
from ..quantizers import WeightQuantizer
from ..calibration.fisher import output_logits

logger = logging.get_logger(__name__)

_CACHE_VERSION = 1
_EXACT_MAX_CLASSES = 16  # up to this many classes the Fisher sums over all of them; above, one sampled label
# A block forward per pair and batch: 4× the cost of the singles on all of MiniLM-L6's 256 samples, while
# 64 samples already give a stable estimate (rank correlation 0.73 between two disjoint sets of 64).
_PAIR_SAMPLES = 64
# Tokens per measured forward pass: every block Linear's input, output and Fisher are held at once (with a
# vocabulary-sized output distribution, GBs per 1k tokens for a 30-layer LM), so batches are split to this.
_MAX_TOKENS = 1024
_FP_ACT_BITS = 32  # activation bits of a weight-only layer in the BOPs count (float32 inputs)


@dataclass
class LayerCost:
    """What one block Linear costs at each candidate bit-width, for the budget constraints."""

    params: int  # also the MACs per token: a Linear does one multiply-accumulate per weight
    act_bits: int
    packed_bytes: dict[int, int]  # bits -> bytes of the packed codes plus scales and zero points


@dataclass
class Sensitivity:
    singles: dict[str, dict[int, float]]  # module -> bits -> estimated KL increase per sample
    pairs: dict[tuple[str, str], float]  # (module, module) -> excess at the lowest bits, same units


@dataclass
class Allocation:
    bits: dict[str, int]  # chosen bits of the Linears the solver was free to set
    usage: dict[str, float]  # budget -> what the chosen bits use (pinned Linears included)
    allowed: dict[str, float]
    predicted_loss: float


def block_linears(model: nn.Module, adapter: ArchitectureAdapter, config: QLimitConfig) -> dict[str, dict[str, Any]]:
    """Name -> layer-config spec of every Linear inside the blocks that quantization converts."""
    prefix = adapter.blocks_name(model) + "."
    plan = adapter.layer_config(model, config)
    return {name: spec for name, spec in plan.items() if spec["kind"] == "linear" and name.startswith(prefix)}


def layer_costs(model: nn.Module, specs: dict[str, dict[str, Any]], config: QLimitConfig) -> dict[str, LayerCost]:
    costs = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        packed = {}
        for bits in sorted(set(config.bit_candidates or []) | {spec["w"]}):
            # Count exactly what a frozen QuantLinear saves (codes, scales, zero points), built on meta: no memory.
            with torch.device("meta"):
                q = QuantLinear(linear.in_features, linear.out_features, False, bits, None, config.group_size,
                                config.weight_sym, frozen=True)  # fmt: skip
            packed[bits] = sum(t.numel() * t.element_size() for t in q.state_dict().values())
        costs[name] = LayerCost(linear.in_features * linear.out_features, spec.get("a") or _FP_ACT_BITS, packed)
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


def _fisher_losses(logits: list[torch.Tensor], mask: torch.Tensor, cfg: Any, gen: torch.Generator):
    """Losses whose squared gradients, summed, give the diagonal Fisher of the model's output distribution."""
    regression = getattr(cfg, "problem_type", None) == "regression" or getattr(cfg, "num_labels", 2) == 1
    for z in logits:
        z = z.float()
        if regression:  # Gaussian of unit variance around the prediction: Fisher = JᵀJ
            yield z.sum()
            continue
        logp = F.log_softmax(z, -1)
        if z.dim() == 2 and z.shape[-1] <= _EXACT_MAX_CLASSES:
            # Samples are independent, so weighting sample i by √p_ic scales its squared gradient by p_ic.
            p = logp.detach().exp()
            for c in range(z.shape[-1]):
                yield -(p[:, c].sqrt() * logp[:, c]).sum()
            continue
        # One label per position drawn from the model: an unbiased estimate (cross-position terms average out).
        probs = logp.detach().exp().reshape(-1, z.shape[-1]).cpu()
        y = torch.multinomial(probs, 1, generator=gen).reshape(logp.shape[:-1]).to(z.device)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        yield nll[mask].sum() if nll.shape == mask.shape else nll.sum()


@contextmanager
def _quantized_weights(linears: dict[str, nn.Linear], names, quantizers: dict, bits: int):
    """Temporarily replaces the weights of `names` by their round-to-nearest copies at `bits`."""
    saved = {n: linears[n].weight.data for n in names}
    try:
        for n in names:
            linears[n].weight.data = quantizers[n, bits](saved[n])
        yield
    finally:
        for n, w in saved.items():
            linears[n].weight.data = w


@torch.no_grad()
def _add_pair_excess(totals: dict, block: nn.Module, io: tuple, fisher: torch.Tensor, members: list[str],
                     linears: dict, quantizers: dict, low: int) -> None:  # fmt: skip
    """Adds E(a, b) − E(a) − E(b) for each pair of `members`, E the Fisher-weighted error at the block output."""
    hidden, args, kwargs = io
    fp = block_output(block(hidden, *args, **kwargs))
    error = {}
    for subset in [(n,) for n in members] + list(itertools.combinations(members, 2)):
        with _quantized_weights(linears, subset, quantizers, low):
            out = block_output(block(hidden, *args, **kwargs))
        error[subset] = 0.5 * (fisher * (out - fp).float().pow(2)).sum().item()
        if len(subset) == 2:
            totals[subset] = totals.get(subset, 0.0) + error[subset] - error[subset[:1]] - error[subset[1:]]


def _split_batch(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """`batch` in row slices of at most `max_tokens` tokens (at least one row each)."""
    rows, length = batch["input_ids"].shape[:2]
    step = max(1, max_tokens // max(1, length))
    if step >= rows:
        return [batch]
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, rows, step)]


def measure_sensitivity(model: nn.Module, adapter: ArchitectureAdapter, batches: list[dict[str, torch.Tensor]],
                        config: QLimitConfig, device: torch.device, names: list[str],
                        pairwise: bool = True) -> Sensitivity:  # fmt: skip
    """Δ_l(b) for every Linear of `names` and candidate b, and the pair excesses inside each block."""
    candidates = config.bit_candidates
    batches = [part for batch in batches for part in _split_batch(batch, _MAX_TOKENS)]
    blocks, prefix = adapter.blocks(model), adapter.blocks_name(model) + "."
    linears = {n: model.get_submodule(n) for n in names}
    members: dict[int, list[str]] = {}
    for n in names:
        members.setdefault(int(n[len(prefix) :].split(".")[0]), []).append(n)
    used_blocks = [i for i, group in members.items() if pairwise and len(group) > 1]
    quantizers = {}
    for (n, linear), bits in itertools.product(linears.items(), candidates):
        quantizers[n, bits] = WeightQuantizer(bits, tuple(linear.weight.shape), config.group_size, config.weight_sym)
        quantizers[n, bits].to(linear.weight.device).init_range(linear.weight, config.weight_range_p)
    singles = {n: dict.fromkeys(candidates, 0.0) for n in names}
    pairs: dict[tuple[str, str], float] = {}
    gen = torch.Generator().manual_seed(config.seed)

    seen: dict[Any, tuple] = {}  # this batch: Linear name -> (input, output); block index -> (args, kwargs, output)

    def linear_hook(name: str):
        return lambda module, args, out: seen.__setitem__(name, (args[0].detach(), out))

    def block_hook(i: int):
        def hook(module, args, kwargs, out):
            kwargs = dict(kwargs)
            seen[i] = ((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs), block_output(out))

        return hook

    handles = [linears[n].register_forward_hook(linear_hook(n)) for n in names]
    handles += [blocks[i].register_forward_hook(block_hook(i), with_kwargs=True) for i in used_blocks]
    count = sum(len(b["input_ids"]) for b in batches)
    was_training, grad_flags = model.training, {n: lin.weight.requires_grad for n, lin in linears.items()}
    model.eval()
    try:
        for linear in linears.values():  # a graph through the block Linears; only activation gradients are taken
            linear.weight.requires_grad_(True)
        # Pair terms on batches spread over the data (the pipeline sorts them by length): -(-a // b) is ceil(a / b).
        stride, pair_count = max(1, len(batches) // -(-_PAIR_SAMPLES * len(batches) // count)), 0
        for step, batch in enumerate(tqdm(batches, desc="Measuring sensitivity", unit="batch")):
            with_pairs = used_blocks if step % stride == 0 and pair_count < _PAIR_SAMPLES else []
            batch = to_device(batch, device)
            mask = batch["attention_mask"].bool()
            seen.clear()
            with torch.enable_grad():
                logits = output_logits(model(**batch, use_cache=False))
                targets = [seen[n][1] for n in names] + [seen[i][1] for i in with_pairs]
                fisher = [torch.zeros_like(t) for t in targets]
                for loss in _fisher_losses(logits, mask, model.config, gen):
                    grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                    for f, g in zip(fisher, grads):
                        if g is not None:
                            f.add_(g.detach().float().pow(2))
            for f in fisher:  # padding never counts (its gradient is 0 anyway where padding is masked)
                if f.dim() == 3 and f.shape[:2] == mask.shape:
                    f.mul_(mask.unsqueeze(-1))
            with torch.no_grad():
                for n, f in zip(names, fisher):
                    x, weight = seen[n][0], linears[n].weight
                    for bits in candidates:
                        dz = F.linear(x, quantizers[n, bits](weight) - weight)
                        singles[n][bits] += 0.5 * (f * dz.float().pow(2)).sum().item()
            for i, f in zip(with_pairs, fisher[len(names) :]):
                _add_pair_excess(pairs, blocks[i], seen[i][0], f, members[i], linears, quantizers, candidates[0])
            pair_count += len(mask) if with_pairs else 0
    finally:
        for h in handles:
            h.remove()
        for n, flag in grad_flags.items():
            linears[n].weight.requires_grad_(flag)
        model.train(was_training)
        seen.clear()
    singles = {n: {b: v / count for b, v in per.items()} for n, per in singles.items()}
    return Sensitivity(singles, {p: v / max(pair_count, 1) for p, v in pairs.items()})


def _cache_key(model: nn.Module, batches: list[dict], config: QLimitConfig, names: list[str], pairwise: bool) -> str:
    """Model config + weights fingerprint + candidates + samples (and their tokens) + grid settings."""
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    model_config.pop("_name_or_path", None)
    settings = [_CACHE_VERSION, config.bit_candidates, config.group_size, config.weight_sym, config.weight_range_p]
    # Checkpoints of one architecture share a config: moments of the weights tell them apart, cheaply.
    weights = (model.get_submodule(n).weight.detach().double() for n in names)
    moments = [[w.sum().item(), w.pow(2).sum().item()] for w in weights]
    digest = hashlib.sha256(
        json.dumps([model_config, settings, config.seed, pairwise, moments], sort_keys=True, default=str).encode()
    )
    for batch in batches:  # the samples themselves, hence also their number
        for key in sorted(batch):
            digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    return data.get("entries", {}) if data.get("version") == _CACHE_VERSION else {}


def _sensitivities(model: nn.Module, adapter: ArchitectureAdapter, batches: list[dict], config: QLimitConfig,
                   device: torch.device, names: list[str], pairwise: bool) -> Sensitivity:  # fmt: skip
    """Measured, or read from `config.sensitivity_cache` when this model, data and grid were measured before."""
    path = config.sensitivity_cache
    key = _cache_key(model, batches, config, names, pairwise) if path else None
    entry = _read_cache(path).get(key) if path else None
    if entry is not None:
        logger.info(f"Sensitivities read from {path}")
        singles = {n: {int(b): v for b, v in per.items()} for n, per in entry["singles"].items()}
        return Sensitivity(singles, {(a, b): v for a, b, v in entry["pairs"]})
    started = time.perf_counter()
    sens = measure_sensitivity(model, adapter, batches, config, device, names, pairwise)
    logger.info(f"Measured sensitivities in {time.perf_counter() - started:.1f}s")
    if path:
        entry = {
            "model_type": model.config.model_type, "bit_candidates": config.bit_candidates, "pairwise": pairwise,
            "num_samples": sum(len(b["input_ids"]) for b in batches),
            "singles": {n: {str(b): v for b, v in per.items()} for n, per in sens.singles.items()},
            "pairs": [[a, b, v] for (a, b), v in sens.pairs.items()],
        }  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:  # re-read first: another run may have added its own entry meanwhile
            json.dump({"version": _CACHE_VERSION, "entries": {**_read_cache(path), key: entry}}, f, indent=1)
        os.replace(tmp, path)  # atomic: a run killed mid-write leaves the old cache intact
    return sens


def solve_allocation(sens: Sensitivity, costs: dict[str, LayerCost], config: QLimitConfig,
                     fixed: dict[str, int] | None = None) -> Allocation:  # fmt: skip
    """One candidate per free Linear minimising Σ Δ_l(b_l) + Σ positive pair excesses, within every budget."""
    fixed = fixed or {}
    candidates = config.bit_candidates
    free = [n for n in costs if n not in fixed]
    limits = budget_limits(costs, config)
    if not limits:
        raise ValueError("Mixed precision needs a budget: set `avg_bits` or `size_budget_bytes`.")
    floor = budget_usage(costs, {**{n: candidates[0] for n in free}, **fixed})
    requested = {"bits": ("avg_bits", config.avg_bits), "bytes": ("size_budget_bytes", config.size_budget_bytes),
                 "bops": ("bops_budget", config.bops_budget)}  # fmt: skip
    for key, allowed in limits.items():
        if floor[key] > allowed:
            (name, value), minimum = requested[key], floor["avg_bits" if key == "bits" else key]
            raise ValueError(
                f"{name}={value:.6g} cannot be met: with every block Linear at {candidates[0]} bits (the lowest "
                f"candidate, scales and zero points included) it is already {minimum:.6g}. The minimum achievable "
                f"{name} is {minimum:.6g}."
            )
    if not free:
        return Allocation({}, floor, limits, 0.0)
    col = {(n, b): i for i, (n, b) in enumerate(itertools.product(free, candidates))}
    pairs = [(a, b, v) for (a, b), v in sens.pairs.items() if v > 0 and a in free and b in free]
    nx, ny = len(col), len(pairs)
    cost_vec = np.zeros(nx + ny)
    for (n, b), i in col.items():
        cost_vec[i] = sens.singles[n][b]
    cost_vec[nx:] = [v for _, _, v in pairs]
    cost_vec /= max(np.abs(cost_vec).max(initial=0.0), 1e-30)  # O(1) objective, so HiGHS's absolute gap is moot

    fixed_use = budget_usage({n: costs[n] for n in fixed}, fixed)
    rows = [({col[n, b]: 1 for b in candidates}, 1, 1) for n in free]  # (coefficients, lower, upper) of each row
    budget_rows = {key: len(rows) + k for k, key in enumerate(limits)}
    rows += [({i: _layer_usage(costs[n], b)[key] for (n, b), i in col.items()}, -np.inf, limits[key] - fixed_use[key])
             for key in limits]  # fmt: skip
    # y_k ≥ x[a,low] + x[b,low] − 1: pair k's excess is paid when both are at the lowest bits
    low = candidates[0]
    rows += [({nx + k: 1, col[a, low]: -1, col[b, low]: -1}, -1, np.inf) for k, (a, b, _) in enumerate(pairs)]
    matrix = np.zeros((len(rows), nx + ny))
    for r, (entries, _, _) in enumerate(rows):
        matrix[r, list(entries)] = list(entries.values())
    lower, upper = [r[1] for r in rows], [r[2] for r in rows]
    integrality = np.r_[np.ones(nx), np.zeros(ny)]  # y is integral whenever x is

    for _ in range(3):  # integer coefficients: retry tighter if HiGHS's tolerances let the rounded solution overshoot
        res = milp(cost_vec, constraints=LinearConstraint(matrix, lower, upper),
                   integrality=integrality, bounds=Bounds(0, 1), options={"time_limit": 120.0})  # fmt: skip
        if res.x is None:
            raise RuntimeError(f"The bit allocation ILP found no solution: {res.message}")
        bits = {n: next(b for b in candidates if res.x[col[n, b]] > 0.5) for n in free}
        usage = budget_usage(costs, {**bits, **fixed})
        over = {key: usage[key] - allowed for key, allowed in limits.items() if usage[key] > allowed}
        if not over:
            break
        for key, excess in over.items():
            upper[budget_rows[key]] -= excess
    else:
        raise RuntimeError(f"The bit allocation ILP kept exceeding the budget by {over}.")
    predicted = sum(sens.singles[n][b] for n, b in bits.items())
    predicted += sum(v for a, b, v in pairs if bits[a] == bits[b] == low)
    return Allocation(bits, usage, limits, predicted)


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


def allocate_bits(model: nn.Module, adapter: ArchitectureAdapter, batches: list[dict[str, torch.Tensor]],
                  config: QLimitConfig, device: torch.device, pairwise: bool = True) -> dict[str, int]:  # fmt: skip
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
        sens = _sensitivities(model, adapter, batches, config, device, free, pairwise)
    alloc = solve_allocation(sens, costs, config, fixed)
    _log_summary(alloc, sens, costs, fixed)
    return alloc.bits
