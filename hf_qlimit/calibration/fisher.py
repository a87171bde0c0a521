"""Fisher weights of the reconstruction loss: the squared output gradients of every block (BRECQ's `loss="fisher"`),
damped so that a few tokens cannot carry the whole loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..forward import block_output, output_logits, to_device
from .cache import Stream
from .quant_state import quant_state


def fisher_weights(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict], device: torch.device, damping: float = 1.0
) -> list[Stream]:
    """(|g| + damping)², g the gradients at every block output of KL(FP output ‖ output with round-to-nearest
    weights), normalised to mean |g| = 1 over real tokens (BRECQ's own code uses (|g| + 1)² on raw gradients).

    Undamped g² lets a few elements, such as the CLS token's, carry most of the loss. One forward and backward
    pass per batch serves all blocks. Each block's weights are then normalised to mean 1 over real tokens, so
    the loss keeps the scale of the plain MSE and λ its meaning.
    """
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]
    cfg = model.config
    regression = getattr(cfg, "problem_type", None) == "regression" or getattr(cfg, "num_labels", 2) == 1
    with _block_outputs(blocks) as outputs:
        for batch in batches:
            loss = _output_divergence(model, to_device(batch, device), outputs, regression)
            loss.backward()
            for i, hidden in enumerate(outputs):
                grads[i].append(hidden.grad.detach().abs().cpu())
            outputs.clear()
    masks = [b["attention_mask"].bool() for b in batches]
    return [damped_fisher(per_batch, masks, damping) for per_batch in grads]


@contextmanager
def _block_outputs(blocks: nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """Collects each block's output, with its gradient retained, in the yielded list; the graph starts at the
    first block's input, so that backward stops there."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, out):
        hidden = block_output(out)
        if hidden.requires_grad:
            hidden.retain_grad()
            outputs.append(hidden)

    def start_graph(module, args, kwargs):
        args = list(args)
        if args:
            args[0] = args[0].detach().requires_grad_(True)
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return tuple(args), kwargs

    handles = [b.register_forward_hook(keep) for b in blocks]
    handles.append(blocks[0].register_forward_pre_hook(start_graph, with_kwargs=True))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _output_divergence(
    model: nn.Module, batch: dict[str, torch.Tensor], outputs: list[torch.Tensor], regression: bool
) -> torch.Tensor:
    """KL(FP output ‖ output with round-to-nearest weights), summed over real tokens (the squared error for a
    regression); `outputs` then holds the block outputs of the quantized pass."""
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), quant_state(model, weights=False, acts=False):
        outputs.clear()
        fp = output_logits(model(**batch, use_cache=False))
    outputs.clear()
    with quant_state(model, weights=True, acts=False):
        q = output_logits(model(**batch, use_cache=False))
    if not fp:
        raise ValueError(
            f"loss='fisher' needs a model whose output has logits; {type(model).__name__} has none. "
            "Use loss='mse', or quantize the model with its task or LM head."
        )
    loss = 0.0
    for f, g in zip(fp, q):
        if regression:
            loss = loss + F.mse_loss(g, f, reduction="sum")
            continue
        kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(f, -1), log_target=True, reduction="none").sum(-1)
        loss = loss + (kl[mask].sum() if kl.shape == mask.shape else kl.sum())
    return loss


def damped_fisher(abs_grads: list[torch.Tensor], masks: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(|g|/mean|g| + damping)², scaled to mean 1; the means are over the real tokens of all batches."""
    mean = torch.cat([g[m] for g, m in zip(abs_grads, masks)]).mean().clamp(min=1e-20)
    weights = [(g / mean + damping).pow_(2) for g in abs_grads]
    norm = torch.cat([w[m] for w, m in zip(weights, masks)]).mean().clamp(min=1e-20)
    return [w / norm for w in weights]
