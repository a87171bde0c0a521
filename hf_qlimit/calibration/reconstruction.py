"""Reconstruction of one block (BRECQ / QDrop) or of its Linears one by one (AdaRound).

min ‖block_q(x) − block_fp(x_fp)‖² over the weights' rounding and the LSQ step sizes of the activations. How the
rounding learns is `config.rounding` (rounding.py: AdaRound's V by Adam with the regulariser
λ Σ (1 − |2h − 1|^β), or AutoRound's signed steps by SignSGD); the activation steps (and learned weight steps)
share one Adam with a cosine decay. Every learning rate is the config's, filled in by the preset. QDrop mixes
the block input element-wise between the quantized and the FP stream and keeps each activation in FP with
probability `drop_prob`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..config import QLimitConfig
from ..hf.surgery import quantized_modules
from ..nn.modules import QuantLinear
from ..quantizers.lsq import ActQuantizer, mix
from .block_inputs import BlockInputs, Stream, call_block, run_block
from .quant_state import act_quantizers, quant_state
from .rounding import Rounding, rounding_for
from .weight_init import WeightStart

logger = logging.get_logger(__name__)


@dataclass
class BlockData:
    """Everything the reconstruction of one block needs: one CPU tensor per calibration batch in each list."""

    fp_in: Stream
    q_in: Stream
    fp_out: Stream
    inputs: BlockInputs
    token_mask: list[torch.Tensor]  # (batch, length): False on padding, which the loss ignores
    fisher: Stream | None = None  # squared output gradients, normalised to mean 1


def masked_error(
    out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Squared error summed over features and averaged over real tokens."""
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    err = err.sum(-1)
    mask = mask.to(err.dtype).reshape(mask.shape + (1,) * (err.dim() - mask.dim()))
    return (err * mask).sum() / mask.expand_as(err).sum().clamp(min=1)


@torch.no_grad()
def block_output_error(block: nn.Module, data: BlockData, device: torch.device, q_out: Stream | None = None) -> float:
    """Mean squared output error per token of the quantized block against the FP block."""
    if q_out is None:
        q_out = run_block(block, data.q_in, data.inputs, device)
    total = sum(masked_error(q, t, m, None) * m.sum() for q, t, m in zip(q_out, data.fp_out, data.token_mask))
    return (total / sum(m.sum() for m in data.token_mask)).item()


@dataclass
class ReconStats:
    """How a block's reconstruction ended: the last progress report (its batch, soft and hard-rounded error) and
    the share of rounding variables still undecided (h strictly between 0.01 and 0.99) before hard rounding."""

    undecided: float = 0.0
    soft_error: float = float("nan")
    hard_error: float = float("nan")
    batch: object = None  # the key `step_fn` got for that report (a batch index, or token indices)


def _hard_error(rounding: Rounding, acts: list[ActQuantizer], step_fn: Callable, key) -> float:
    """The error on batch `key` with the rounding as it would be hardened now and no activation dropped."""
    for q in acts:
        q.eval()
    try:
        with rounding.hard(), torch.no_grad():
            return masked_error(*step_fn(key, train=False)).item()
    finally:
        for q in acts:
            q.train()


def optimize(
    modules: dict[str, QuantLinear],
    acts: list[ActQuantizer],
    draw: Callable,
    step_fn: Callable,
    config: QLimitConfig,
    desc: str,
    starts: dict[str, WeightStart] | None = None,
    release_fp: bool = False,
) -> ReconStats:
    """The shared loop: `draw()` picks a mini-batch, `step_fn(key, train)` returns (output, target, mask, weight)
    for it (train: with QDrop's dropping). The rounding of `modules` (by name) follows `config.rounding` (see
    rounding.py), each from its entry of `starts` (taken out of it) or else its FP weight; the steps of `acts` and
    the learned weight steps share one Adam with a cosine decay.

    `release_fp`: the FP weights are not needed after the rounding's initialisation (the targets are cached)."""
    rounding = rounding_for(config)
    weight_steps = rounding.start(modules, {} if starts is None else starts, release_fp)
    scales = [q.begin_reconstruction(config.drop_probability) for q in acts]
    groups = [{"params": scales, "lr": config.act_lr}, {"params": weight_steps, "lr": config.scale_lr}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.iters)) if opt else None
    stats = ReconStats()
    bar = tqdm(range(config.iters), desc=desc, leave=False)
    try:
        for step in bar:
            report = step % 50 == 0 or step == config.iters - 1
            if rounding.before_step(step, report) and opt is None:  # nothing learns any more: the block is final
                stats = ReconStats(0.0, float("nan"), _hard_error(rounding, acts, step_fn, draw()), None)
                break
            key = draw()
            rec = masked_error(*step_fn(key, train=True))
            loss = rounding.loss(rec)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.backward()  # steps AdaRound's variables on the way (rounding.step_in_backward)
            if opt is not None:
                opt.step()
                sched.step()
            rounding.after_step()
            for q in acts:
                q.clamp_step()
            if report:  # after the update: the last report is the final block's
                stats = ReconStats(rounding.undecided(), rec.item(), _hard_error(rounding, acts, step_fn, key), key)
                bar.set_postfix(
                    soft=f"{stats.soft_error:.4g}", hard=f"{stats.hard_error:.4g}", undecided=f"{stats.undecided:.1%}"
                )
        if config.iters == 0:
            stats.undecided = rounding.undecided()
    finally:
        rounding.finish()
        for q in acts:
            q.end_reconstruction()
    return stats


def _sample(n: int, batch_size: int) -> torch.Tensor:
    return torch.randint(0, n, (min(batch_size, n),))


def _fixed_batch(data: BlockData) -> Callable[[], int]:
    """Draws one of the fixed (length-sorted) calibration batches."""
    return lambda: int(torch.randint(0, len(data.q_in), ()))


def random_samples(data: BlockData, batch_size: int) -> Callable[[], list[tuple[int, torch.Tensor]]]:
    """Draws `batch_size` distinct samples from all batches (the reference code's sampling), as (batch, rows)."""
    sizes = [len(m) for m in data.token_mask]
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
    first = torch.tensor([0, *sizes]).cumsum(0)

    def draw() -> list[tuple[int, torch.Tensor]]:
        picked = torch.randperm(len(owner))[: min(batch_size, len(owner))].sort().values
        return [(int(j), picked[owner[picked] == j] - first[j]) for j in owner[picked].unique()]

    return draw


def reconstruct_block(
    block: nn.Module,
    data: BlockData,
    config: QLimitConfig,
    device: torch.device,
    desc: str,
    starts: dict[str, WeightStart] | None = None,
) -> ReconStats:
    """Learns the rounding of every weight and the step of every activation quantizer of `block`. `starts`
    (from `init_block_weights`): where the roundings start, each entry taken out as its rounding begins."""
    if config.method == "adaround":
        return _reconstruct_layerwise(block, data, config, device, desc, starts)
    modules = dict(quantized_modules(block))
    acts = list(act_quantizers(block))
    drop = config.drop_probability

    draw = random_samples(data, config.batch_size) if config.batch_sampling == "random" else _fixed_batch(data)

    def part(j: int, rows: torch.Tensor | None, train: bool):
        def get(t: torch.Tensor) -> torch.Tensor:
            return (t if rows is None else t[rows]).to(device)

        x = get(data.q_in[j])
        if drop > 0 and train:  # QDrop: each input element comes from the FP stream with probability drop_prob
            x = mix(x, get(data.fp_in[j]), drop)
        out = call_block(block, x, data.inputs, j, device, rows)
        weight = get(data.fisher[j]) if data.fisher is not None else None
        return out, get(data.fp_out[j]), get(data.token_mask[j]), weight

    def step(key, train: bool):
        if isinstance(key, int):  # one fixed batch
            return part(key, None, train)
        # samples from several batches: each runs at its own batch's length; their real tokens are pooled
        parts = [part(j, rows, train) for j, rows in key]
        masks = [p[2] for p in parts]
        weight = None if data.fisher is None else torch.cat([p[3][m] for p, m in zip(parts, masks)])
        out, target = (torch.cat([p[i][m] for p, m in zip(parts, masks)]) for i in (0, 1))
        return out, target, torch.ones(len(out), dtype=torch.bool, device=device), weight

    with quant_state(block, weights=True, acts=True):
        return optimize(modules, acts, draw, step, config, desc, starts, release_fp=True)


@torch.no_grad()
def _linear_inputs(
    block: nn.Module, linear: nn.Module, hidden: Stream, data: BlockData, device: torch.device
) -> torch.Tensor:
    """Inputs that reach `linear` (before its own quantizer) from `hidden`, one row per real token."""
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().cpu()))
    try:
        run_block(block, hidden, data.inputs, device)
    finally:
        handle.remove()
    # (batch, length, features) or, in OPT's FFN, (batch · length, features): keep the real tokens
    return torch.cat([x.reshape(-1, x.shape[-1])[m.reshape(-1)] for x, m in zip(seen, data.token_mask)])


def _reconstruct_layerwise(
    block: nn.Module,
    data: BlockData,
    config: QLimitConfig,
    device: torch.device,
    desc: str,
    starts: dict[str, WeightStart] | None,
) -> ReconStats:
    """AdaRound: each Linear on its own, fed by the quantized stream, targeting the FP Linear on FP inputs."""
    tokens_per_batch = max(1, int(sum(m.sum() for m in data.token_mask)) // len(data.token_mask))
    layer_stats: list[ReconStats] = []
    undecided: list[float] = []
    for name, module in quantized_modules(block):
        if not isinstance(module, QuantLinear):  # fused experts: their inputs are routed inside their forward
            logger.warning_once(
                f"method='adaround' reconstructs Linear by Linear: the {type(module).__name__}s of fused MoE experts "
                "are rounded to nearest (method='brecq' or 'qdrop' reconstruct them with their block)."
            )
            continue
        with quant_state(block, weights=False, acts=False):
            x_fp = _linear_inputs(block, module, data.fp_in, data, device)
            target = torch.cat([module(x_fp[i : i + 4096].to(device)).cpu() for i in range(0, len(x_fp), 4096)])
        with quant_state(block, weights=True, acts=True):
            x_q = _linear_inputs(block, module, data.q_in, data, device)

        def draw(x_q=x_q) -> torch.Tensor:
            return _sample(x_q.shape[0], tokens_per_batch)

        def step(index, train, module=module, x_q=x_q, target=target):
            mask = torch.ones(len(index), dtype=torch.bool, device=device)
            return module(x_q[index].to(device)), target[index].to(device), mask, None

        acts = [module.input_quantizer] if module.input_quantizer is not None else []
        with quant_state(module, weights=True, acts=True):  # ends hard: the FP stream can still switch it off
            layer_stats.append(optimize({name: module}, acts, draw, step, config, f"{desc} {name}", starts))
        undecided.append(layer_stats[-1].undecided * module.weight.numel())
    total = sum(m.weight.numel() for _, m in quantized_modules(block) if isinstance(m, QuantLinear))
    return ReconStats(undecided=sum(undecided) / max(1, total))
