"""GPTQ-style error-compensated rounding on a fixed grid, and a grid search by the diag-approximated output error.

GPTQ (Frantar et al., 2022) rounds a Linear's weight one input column at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse Hessian H = 2/N Σ xᵀx of the layer's inputs, so the
output error ‖X(W − Q)ᵀ‖² stays small. Here the grid (scale, zero per row and group) is given, e.g. by
`search_weight_range`, and kept: only the rounding changes. The result is returned as the *compensated float
weight* w̃, the value each column held just before it was rounded. Rounding w̃ to nearest gives GPTQ's codes, and
AdaRound can start from it (V from frac(w̃ / s)) instead of from w.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from .fake_quant import quantize_codes
from .range_search import group_view, search_grouped_rows

logger = logging.get_logger(__name__)


class HessianAccumulator:
    """H = 2/N Σ xᵀx over every token fed to `add` (float32, in_features × in_features).

    Kept as a running mean rather than a sum, as GPTQ does: the sum over millions of tokens would grow until float32
    loses the small batches' contributions; the mean stays at the scale of one token's xᵀx.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.device = device
        self.hessian: torch.Tensor | None = None  # allocated on the first batch's device unless `device` is given
        self.count = 0  # tokens seen so far

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds the rows of `x` (any leading shape, last dim in_features); `mask` (x.shape[:-1], bool) keeps the
        tokens where it is True, so padding does not count."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match inputs {tuple(x.shape[:-1])}")
            rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        if self.hessian is None:
            device = self.device if self.device is not None else rows.device
            self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)
        new = rows.shape[0]
        if new == 0:
            return
        rows = rows.to(device=self.hessian.device, dtype=torch.float32)
        total = self.count + new
        # mean over `total` tokens = old mean · count/total + 2/total · Σ_batch xᵀx
        self.hessian.mul_(self.count / total).addmm_(rows.t(), rows, alpha=2.0 / total)
        self.count = total

    def hook(self, module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Registers a forward pre-hook on `module` (a Linear) that adds all of its inputs (no mask);
        call `.remove()` on the returned handle when done."""
        return module.register_forward_pre_hook(lambda _mod, args: self.add(args[0]))


def _column_groups(in_features: int, group_size: int | None, groups: int, device: torch.device) -> torch.Tensor:
    """The group (index into the grid's second dim) of each input column."""
    if groups == 1:
        return torch.zeros(in_features, dtype=torch.long, device=device)
    if group_size is None or group_size * groups != in_features:
        raise ValueError(f"a grid with {groups} groups does not match {in_features} inputs in groups of {group_size}")
    return torch.arange(in_features, device=device) // group_size


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float, retries: int = 6) -> torch.Tensor:
    """Upper triangular U with H⁻¹ = UᵀU, H damped by `damp` · mean(diag H) on the diagonal.

    Row i of U gives what rounding column i costs once the columns before it are fixed: U[i,i]² is the diagonal
    entry of (H restricted to columns i..)⁻¹, and U[i,j]/U[i,i] how much of column i's error column j > i takes up.
    One Cholesky factor thus replaces GPTQ's original rank-one downdates of H⁻¹ after each column.
    A calibration set smaller than in_features gives a singular H: more damping is tried, ×10 each time (from
    1e-4 if `damp` is 0).
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    fraction = damp
    for _ in range(retries):
        lower, info = torch.linalg.cholesky_ex(hessian + fraction * mean_diag * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                if fraction != damp:
                    logger.warning(f"GPTQ: the Hessian needed damping {fraction:g} (asked {damp:g}) to be inverted.")
                return upper
        fraction = max(fraction * 10, 1e-4)
    raise torch.linalg.LinAlgError(f"GPTQ: the Hessian is not positive definite even with damping {fraction / 10:g}")


@torch.no_grad()
def gptq_compensated_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ's compensated float weight w̃ (float32, weight's shape and device) on the fixed grid (scale, zero).

    `scale` and `zero` have shape (out, groups) as from `search_weight_range`; `hessian` is H = 2/N Σ xᵀx of the
    Linear's inputs (see HessianAccumulator). Column j of w̃ is column j of the weight after the error feedback of
    every column rounded before it, so `quantize_codes(group_view(w̃, group_size), scale, zero, bits)` are exactly
    GPTQ's codes. Inputs never active (H[j,j] = 0) get weight 0. With `act_order` the columns are rounded in
    order of decreasing H[j,j]; each keeps its own group's grid.
    """
    out_features, in_features = weight.shape
    device = weight.device
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    scale = scale.to(device=device, dtype=torch.float32).reshape(out_features, -1)
    zero = zero.to(device=device, dtype=torch.float32).reshape(out_features, -1)
    col_group = _column_groups(in_features, group_size, scale.shape[1], device)

    w = weight.detach().to(device=device, dtype=torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    # A dead input's row and column of H are zero: a unit diagonal keeps H invertible without coupling it to
    # other columns, and its weight, which no calibration token sees, goes to 0 (exactly on the grid).
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h, col_group = w[:, perm], h[perm][:, perm], col_group[perm]
    u = _upper_inverse_cholesky(h, damp)
    del h
    compensated = _compensate_columns(w, u, scale, zero, col_group, bits, block_size)
    if act_order:
        compensated = compensated[:, torch.argsort(perm)]
    return compensated


def _compensate_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    col_group: torch.Tensor,
    bits: int,
    block_size: int,
) -> torch.Tensor:
    """GPTQ's loop (IST-DASLab's `fasterquant`) on `w`, which it overwrites, columns in blocks of `block_size`:
    each column's rounding error, divided by U[i,i], goes right away into the later columns of its block (a
    rank-one update), and at the block's end into all later blocks (one matmul). Returns every column as it
    was just before its rounding."""
    in_features = w.shape[1]
    compensated = torch.empty_like(w)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end]  # updated in place within the block; later blocks get one matmul at the end
        u_block = u[start:end, start:end]
        s_block, z_block = scale[:, col_group[start:end]], zero[:, col_group[start:end]]
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = block[:, i]
            compensated[:, start + i] = col
            q = quantize_codes(col, s_block[:, i], z_block[:, i], bits).sub_(z_block[:, i]).mul_(s_block[:, i])
            err = (col - q).div_(u_block[i, i])
            # columns i+1.. of the block absorb the error (column i itself is done; its value no longer matters)
            block[:, i + 1 :].addr_(err, u_block[i, i + 1 :], alpha=-1.0)
            errors[:, i] = err
        if end < in_features:
            w[:, end:].addmm_(errors, u[start:end, end:], alpha=-1.0)
    return compensated


@torch.no_grad()
def search_weight_range_output(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, symmetric: bool, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of shape (out, groups), as `search_weight_range`, each row's (group's) clipping chosen by
    Σ_j H_jj (w − q)_j², the Linear's output error with H's off-diagonal dropped, rather than by the Lp weight error.
    `hessian` may also be just its diagonal (a vector of in_features)."""
    diag = hessian.diagonal() if hessian.dim() == 2 else hessian
    w = group_view(weight.detach().float(), group_size)
    weight_of = group_view(diag.to(device=w.device, dtype=torch.float32).reshape(1, -1), group_size)
    return search_grouped_rows(w, bits, symmetric, 2.0, err_weight=weight_of)
