"""Reconstruction of one block (BRECQ / QDrop) or of its Linears one by one (AdaRound).

min ‖block_q(x) − block_fp(x_fp)‖² + λ Σ (1 − |2h − 1|^β) over AdaRound's rounding variables (Adam, lr 1e-3)
and the LSQ step sizes (Adam, lr 4e-5, cosine decay). QDrop mixes the block input element-wise between the
quantized and the FP stream and keeps each activation in FP with probability `drop_prob`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .block_inputs import BlockInputs, Stream, call_block, run_block
from ..config import QLimitConfig
from ..hf.surgery import act_quantizers, quant_state, quantized_modules
from ..nn.modules import QuantLinear
from ..quantizers import beta_schedule, hardened_fraction
from ..quantizers.lsq import mix
from ..quantizers.signround import SignSGD


@dataclass
class BlockData:
    """Everything the reconstruction of one block needs: one CPU tensor per calibration batch in each list."""

    fp_in: Stream
    q_in: Stream
    fp_out: Stream
    inputs: BlockInputs
    token_mask: list[torch.Tensor]  # (batch, length): False on padding, which the loss ignores
    fisher: Stream | None = None  # squared output gradients, normalised to mean 1


def _masked_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
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
    total = sum(_masked_error(q, t, m, None) * m.sum() for q, t, m in zip(q_out, data.fp_out, data.token_mask))
    return (total / sum(m.sum() for m in data.token_mask)).item()


def _adam(param: torch.Tensor, lr: float) -> torch.optim.Adam:
    """torch's Adam for one tensor: fused where torch has the kernel (CPU, CUDA), one pass with no weight-sized
    temporaries, where the single-tensor path made two and took about 6x as long (1.9 ms against 11.4 ms for one
    1536x384 matrix, one thread)."""
    return torch.optim.Adam([param], lr=lr, fused=param.device.type in ("cpu", "cuda") and param.is_floating_point())


def _step_in_backward(params: list[nn.Parameter], lr: float) -> list:
    """Adam on each of `params` as soon as its gradient is complete (autograd sums every use of a leaf before
    accumulating, so once per backward pass), which is then freed: a block's gradients never exist all at
    once. Adam is elementwise, so this equals one Adam stepped after backward. Returns the hook handles."""
    optimizers = {id(p): _adam(p, lr) for p in params}

    def step(p: nn.Parameter) -> None:
        optimizers[id(p)].step()
        p.grad = None

    return [p.register_post_accumulate_grad_hook(step) for p in params]


@dataclass
class ReconStats:
    """How a block's reconstruction ended: the last progress report (its batch, soft and hard-rounded error) and
    the share of rounding variables still undecided (h strictly between 0.01 and 0.99) before hard rounding."""

    undecided: float = 0.0
    soft_error: float = float("nan")
    hard_error: float = float("nan")
    batch: object = None  # the key `step_fn` got for that report (a batch index, or token indices)


def _hard_error(modules: list[QuantLinear], acts: list, step_fn: Callable, key) -> float:
    """The error on batch `key` with the rounding as it would be hardened now and no activation dropped."""
    for m in modules:
        m.weight_quantizer.hard = True
    for q in acts:
        q.eval()
    try:
        with torch.no_grad():
            return _masked_error(*step_fn(key, train=False)).item()
    finally:
        for m in modules:
            m.weight_quantizer.hard = False
        for q in acts:
            q.train()


def _undecided(modules: list[QuantLinear]) -> float:
    counts = [m.weight_quantizer.undecided() for m in modules]
    return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))


def _optimize(
    modules: list[QuantLinear],
    acts: list,
    draw: Callable,
    step_fn: Callable,
    config: QLimitConfig,
    desc: str,
    release_fp: bool = False,
) -> ReconStats:
    """The shared loop: `draw()` picks a mini-batch, `step_fn(key, train)` returns (output, target, mask, weight)
    for it (train: with QDrop's dropping).

    `release_fp`: the FP weights are not needed after AdaRound's initialisation (the targets are cached)."""
    signed = config.rounding == "sign"  # AutoRound's update: hard rounding throughout, the best iterate kept
    sign_params: list[nn.Parameter] = []
    for module in modules:
        if signed:
            sign_params += module.weight_quantizer.init_sign(module.weight, config.learn_weight_scale)
        else:
            module.weight_quantizer.init_adaround(module.weight)
        if release_fp:
            module.weight_quantizer.release_weight(module)
    alphas = [m.weight_quantizer.alpha for m in modules if m.weight_quantizer.alpha is not None]
    log_scales = [m.weight_quantizer.learn_scale() for m in modules] if config.learn_weight_scale and not signed else []
    sign_opt = SignSGD(sign_params, config.weight_lr, config.iters) if sign_params else None
    best_loss, best = float("inf"), None
    scales = [q.scale for q in acts]
    for p in scales:
        p.requires_grad_(True)
    hooks = _step_in_backward(alphas, config.weight_lr)
    groups = [g for g in ({"params": scales, "lr": config.act_lr}, {"params": log_scales, "lr": config.scale_lr}) if g["params"]]
    opt = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.iters)) if opt else None
    progressive = config.rounding == "progressive"
    rounds = max(1, config.iters // 20)  # progressive hardening: about 20 rounds
    for q in acts:
        q.drop_prob = config.drop_probability
        q.train()  # only the quantizers: the block stays in eval mode, so dropout stays off
    stats, all_hard = ReconStats(), False
    bar = tqdm(range(config.iters), desc=desc, leave=False)
    try:
        for step in bar:
            if progressive and not all_hard:
                fraction = hardened_fraction(step, config.iters, config.warmup)
                if fraction > 0 and (step % rounds == 0 or fraction == 1.0):
                    for module in modules:
                        module.weight_quantizer.harden_fraction(fraction)
                if fraction == 1.0:  # V has no gradient left: only the steps train from here, at less cost
                    all_hard = True
                    for alpha in alphas:
                        alpha.requires_grad_(False)
                    if not groups:  # nothing else learns (weight-only, fixed steps): the block is final
                        stats = ReconStats(0.0, float("nan"), _hard_error(modules, acts, step_fn, draw()), None)
                        break
            beta = None if signed else beta_schedule(step, config.iters, config.warmup, *config.beta_range)
            report = step % 50 == 0 or step == config.iters - 1
            for module in modules:  # the forward pass computes the regulariser alongside the weight
                module.weight_quantizer.beta = beta
                module.weight_quantizer.report_reg = report  # its value only shows in the progress bar
            key = draw()
            rec = _masked_error(*step_fn(key, train=True))
            loss = rec
            if beta is not None and alphas and not all_hard:
                loss = rec + config.round_loss_weight * sum(m.weight_quantizer.rounding_loss() for m in modules)
            if sign_opt is not None and (value := rec.item()) < best_loss:  # the codes' loss before this step
                best_loss, best = value, [p.detach().clone() for p in sign_params]
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            if sign_opt is not None:
                sign_opt.zero_grad(set_to_none=True)
            loss.backward()  # steps the rounding variables on the way (_step_in_backward)
            if opt is not None:
                opt.step()
            if sign_opt is not None:
                sign_opt.step()
                for module in modules:
                    module.weight_quantizer.sign.clamp_()
            if sched is not None:
                sched.step()
            for q in acts:  # a step size must stay positive
                q.scale.data.clamp_(min=1e-8)
            if report:  # after the update: the last report is the final block's
                stats = ReconStats(_undecided(modules), rec.item(), _hard_error(modules, acts, step_fn, key), key)
                bar.set_postfix(soft=f"{stats.soft_error:.4g}", hard=f"{stats.hard_error:.4g}",
                                undecided=f"{stats.undecided:.1%}")  # fmt: skip
        if best is not None:
            with torch.no_grad():
                for p, b in zip(sign_params, best):
                    p.copy_(b)
        if config.iters == 0:
            stats.undecided = _undecided(modules)
    finally:
        for hook in hooks:
            hook.remove()
        for module in modules:
            module.weight_quantizer._reg, module.weight_quantizer.beta = None, None  # drops the last graph
            module.weight_quantizer.report_reg = True
            module.weight_quantizer.finish_learning()  # hard rounding, learned steps into `scale`
        for q in acts:
            q.drop_prob = 0.0
            q.eval()
        for p in scales:
            p.requires_grad_(False)
            p.grad = None
    return stats


def _sample(n: int, batch_size: int) -> torch.Tensor:
    return torch.randint(0, n, (min(batch_size, n),))


def _fixed_batch(data: BlockData) -> Callable[[], int]:
    """Draws one of the fixed (length-sorted) calibration batches."""
    return lambda: int(torch.randint(0, len(data.q_in), ()))


def _random_samples(data: BlockData, batch_size: int) -> Callable[[], list[tuple[int, torch.Tensor]]]:
    """Draws `batch_size` distinct samples from all batches (the reference code's sampling), as (batch, rows)."""
    sizes = [len(m) for m in data.token_mask]
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
    first = torch.tensor([0, *sizes]).cumsum(0)

    def draw() -> list[tuple[int, torch.Tensor]]:
        picked = torch.randperm(len(owner))[: min(batch_size, len(owner))].sort().values
        return [(int(j), picked[owner[picked] == j] - first[j]) for j in owner[picked].unique()]

    return draw


def reconstruct_block(
    block: nn.Module, data: BlockData, config: QLimitConfig, device: torch.device, desc: str
) -> ReconStats:
    """Learns the rounding of every weight and the step of every activation quantizer of `block`."""
    if config.method == "adaround":
        return _reconstruct_layerwise(block, data, config, device, desc)
    modules = [m for _, m in quantized_modules(block)]
    acts = list(act_quantizers(block))
    drop = config.drop_probability

    draw = _random_samples(data, config.batch_size) if config.batch_sampling == "random" else _fixed_batch(data)

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
        return _optimize(modules, acts, draw, step, config, desc, release_fp=True)


@torch.no_grad()
def _linear_inputs(block: nn.Module, linear: nn.Module, hidden: Stream, data: BlockData, device: torch.device) -> torch.Tensor:
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
    block: nn.Module, data: BlockData, config: QLimitConfig, device: torch.device, desc: str
) -> ReconStats:
    """AdaRound: each Linear on its own, fed by the quantized stream, targeting the FP Linear on FP inputs."""
    tokens_per_batch = max(1, int(sum(m.sum() for m in data.token_mask)) // len(data.token_mask))
    layer_stats: list[ReconStats] = []
    undecided: list[float] = []
    for name, module in quantized_modules(block):
        if not isinstance(module, QuantLinear):
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
            layer_stats.append(_optimize([module], acts, draw, step, config, f"{desc} {name}"))
        undecided.append(layer_stats[-1].undecided * module.weight.numel())
    total = sum(m.weight.numel() for _, m in quantized_modules(block) if isinstance(m, QuantLinear))
    return ReconStats(undecided=sum(undecided) / max(1, total))
