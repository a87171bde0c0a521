"""How much quantizing each block Linear costs: Δ_l(b) per Linear and candidate bits, and the pair excesses.

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

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import QLimitConfig
from ..forward import block_output, output_logits, to_device
from ..hf.layer_kinds import as_stored, matmul_weight
from ..models.base import ArchitectureAdapter
from ..quantizers import WeightQuantizer

_EXACT_MAX_CLASSES = 16  # up to this many classes the Fisher sums over all of them; above, one sampled label
# A block forward per pair and batch costs several times the singles over all samples, while a few dozen
# samples already rank the pairs stably: the pairs are measured on this many.
_PAIR_SAMPLES = 64
# Tokens per measured forward pass: every block Linear's input, output and Fisher are held at once (with a
# vocabulary-sized output distribution, GBs per 1k tokens for a 30-layer LM), so batches are split to this.
_MAX_TOKENS = 1024

Quantizers = dict[tuple[str, int], WeightQuantizer]  # (Linear name, bits) -> its round-to-nearest quantizer


@dataclass
class Sensitivity:
    singles: dict[str, dict[int, float]]  # module -> bits -> estimated KL increase per sample
    pairs: dict[tuple[str, str], float]  # (module, module) -> excess at the lowest bits, same units


def measure_sensitivity(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: list[dict[str, torch.Tensor]],
    config: QLimitConfig,
    device: torch.device,
    names: list[str],
    pairwise: bool = True,
) -> Sensitivity:
    """Δ_l(b) for every Linear of `names` and candidate b, and the pair excesses inside each block."""
    batches = [part for batch in batches for part in _split_batch(batch, _MAX_TOKENS)]
    probe = _Probe(model, adapter, config, names, pairwise)
    gen = torch.Generator().manual_seed(config.seed)
    count = sum(len(b["input_ids"]) for b in batches)
    # Pair terms on batches spread over the data (the pipeline sorts them by length): -(-a // b) is ceil(a / b).
    stride = max(1, len(batches) // -(-_PAIR_SAMPLES * len(batches) // count))
    with probe.recording(), _graph_through(model, probe.linears.values()):
        for step, batch in enumerate(tqdm(batches, desc="Measuring sensitivity", unit="batch")):
            pairs_now = step % stride == 0 and probe.pair_count < _PAIR_SAMPLES
            probe.measure(to_device(batch, device), probe.pair_blocks if pairs_now else [], gen)
    return probe.result(count)


def _split_batch(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """`batch` in row slices of at most `max_tokens` tokens (at least one row each)."""
    rows, length = batch["input_ids"].shape[:2]
    step = max(1, max_tokens // max(1, length))
    if step >= rows:
        return [batch]
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, rows, step)]


@contextmanager
def _graph_through(model: nn.Module, linears: Iterable[nn.Linear]) -> Iterator[None]:
    """Eval mode, and a graph through the block Linears (only activation gradients are taken); restored after."""
    linears = list(linears)
    was_training, grad_flags = model.training, [linear.weight.requires_grad for linear in linears]
    model.eval()
    try:
        for linear in linears:
            linear.weight.requires_grad_(True)
        yield
    finally:
        for linear, flag in zip(linears, grad_flags):
            linear.weight.requires_grad_(flag)
        model.train(was_training)


class _Probe:
    """One measurement: the forward hooks that record each batch, and the sums over the batches so far."""

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, config: QLimitConfig, names: list[str], pairwise: bool
    ) -> None:
        self.model, self.names, self.candidates = model, names, config.bit_candidates
        self.blocks = adapter.blocks(model)
        self.linears = {n: model.get_submodule(n) for n in names}
        self.members = _block_members(names, adapter.blocks_name(model) + ".")
        self.pair_blocks = [i for i, group in self.members.items() if pairwise and len(group) > 1]
        self.quantizers = _rtn_quantizers(self.linears, config)
        self.singles = {n: dict.fromkeys(self.candidates, 0.0) for n in names}
        self.pairs: dict[tuple[str, str], float] = {}
        self.pair_count = 0  # samples the pair excesses were summed over
        self.seen: dict[Any, tuple] = {}  # this batch: Linear name -> (input, output); block -> (io, output)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks on the Linears (input, output) and on the blocks that have pairs (arguments, output)."""

        def linear_hook(name: str):
            return lambda module, args, out: self.seen.__setitem__(name, (args[0].detach(), out))

        def block_hook(i: int):
            def hook(module, args, kwargs, out):
                kwargs = dict(kwargs)
                self.seen[i] = ((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs), block_output(out))

            return hook

        handles = [self.linears[n].register_forward_hook(linear_hook(n)) for n in self.names]
        handles += [self.blocks[i].register_forward_hook(block_hook(i), with_kwargs=True) for i in self.pair_blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.seen.clear()

    def measure(self, batch: dict[str, torch.Tensor], pair_blocks: list[int], gen: torch.Generator) -> None:
        """Adds one batch's Δ_l(b) and, for `pair_blocks`, its pair excesses."""
        mask = batch["attention_mask"].bool()
        self.seen.clear()
        fisher = self._output_fisher(batch, mask, pair_blocks, gen)
        self._add_singles(fisher[: len(self.names)])
        low = self.candidates[0]
        for i, f in zip(pair_blocks, fisher[len(self.names) :]):
            _add_pair_excess(
                self.pairs, self.blocks[i], self.seen[i][0], f, self.members[i], self.linears, self.quantizers, low
            )
        self.pair_count += len(mask) if pair_blocks else 0

    def _output_fisher(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, pair_blocks: list[int], gen: torch.Generator
    ) -> list[torch.Tensor]:
        """The diagonal Fisher at each Linear's output, then at each block output of `pair_blocks`."""
        with torch.enable_grad():
            logits = output_logits(self.model(**batch, use_cache=False))
            targets = [self.seen[n][1] for n in self.names] + [self.seen[i][1] for i in pair_blocks]
            fisher = [torch.zeros_like(t) for t in targets]
            for loss in _fisher_losses(logits, mask, self.model.config, gen):
                grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.add_(g.detach().float().pow(2))
        for f in fisher:  # padding never counts (its gradient is 0 anyway where padding is masked)
            if f.dim() == 3 and f.shape[:2] == mask.shape:
                f.mul_(mask.unsqueeze(-1))
        return fisher

    @torch.no_grad()
    def _add_singles(self, fisher: list[torch.Tensor]) -> None:
        for n, f in zip(self.names, fisher):
            x, weight = self.seen[n][0], matmul_weight(self.linears[n])  # [out, in], also of a Conv1D
            for bits in self.candidates:
                dz = F.linear(x, self.quantizers[n, bits](weight) - weight)
                self.singles[n][bits] += 0.5 * (f * dz.float().pow(2)).sum().item()

    def result(self, count: int) -> Sensitivity:
        """The sums as means: singles per sample of all `count`, pairs per sample they were measured on."""
        singles = {n: {b: v / count for b, v in per.items()} for n, per in self.singles.items()}
        return Sensitivity(singles, {p: v / max(self.pair_count, 1) for p, v in self.pairs.items()})


def _block_members(names: list[str], prefix: str) -> dict[int, list[str]]:
    """Block index -> the Linears of `names` inside it (names start with `prefix`, the blocks' container)."""
    members: dict[int, list[str]] = {}
    for n in names:
        members.setdefault(int(n[len(prefix) :].split(".")[0]), []).append(n)
    return members


def _rtn_quantizers(linears: dict[str, nn.Linear], config: QLimitConfig) -> Quantizers:
    """A round-to-nearest quantizer on the Lp-searched grid for every Linear and candidate bits."""
    quantizers = {}
    for (n, linear), bits in itertools.product(linears.items(), config.bit_candidates):
        weight = matmul_weight(linear)
        quantizers[n, bits] = WeightQuantizer(bits, tuple(weight.shape), config.group_size, config.weight_sym)
        quantizers[n, bits].to(weight.device).init_range(weight, config.weight_range_p)
    return quantizers


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
def _quantized_weights(linears: dict[str, nn.Linear], names: Iterable[str], quantizers: Quantizers, bits: int):
    """Temporarily replaces the weights of `names` by their round-to-nearest copies at `bits`."""
    saved = {n: linears[n].weight.data for n in names}
    try:
        for n in names:
            linear = linears[n]
            linear.weight.data = as_stored(linear, quantizers[n, bits](as_stored(linear, saved[n])))
        yield
    finally:
        for n, w in saved.items():
            linears[n].weight.data = w


@torch.no_grad()
def _add_pair_excess(
    totals: dict,
    block: nn.Module,
    io: tuple,
    fisher: torch.Tensor,
    members: list[str],
    linears: dict,
    quantizers: Quantizers,
    low: int,
) -> None:
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
