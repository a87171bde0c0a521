"""The explicit op a transform leaves where nothing can absorb it: x -> ((x − shift) / smooth) · R before a Linear.

The Linear's weight and bias carry the inverse (W' = (W · diag(smooth)) R, b' = b + W·shift), so the pair
computes exactly what the Linear alone did, and the Linear's input quantizer sees the flattened tensor. Deployed,
this is per-channel arithmetic fused into the producing kernel (a LayerNorm whose output feeds both a residual
and these Linears) plus, for `rotate`, an online Hadamard transform. The op is saved: `shift` and `smooth` are
buffers of the checkpoint, R is rebuilt from the size, and the layer config records which ops a Linear has
(`spec()`), so `from_pretrained` rebuilds the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .hadamard import hadamard, rotate

KIND = "input_transform"


def matrix(layer: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear, or a view of it for transformers' Conv1D (stored [in, out]): in-place
    changes to it change the layer."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def in_features(layer: nn.Module) -> int:
    return matrix(layer).shape[1]


def out_features(layer: nn.Module) -> int:
    return matrix(layer).shape[0]


class InputTransform(nn.Module):
    """Wraps the Linear (or GPT-2's Conv1D) `linear`, kept as a child so its name gains `.linear`, behind an input
    transform."""

    def __init__(self, linear: nn.Module, shift: bool = False, smooth: bool = False, rotate: bool = False) -> None:
        super().__init__()
        self.linear = linear
        features = in_features(linear)
        device = next(linear.parameters(), torch.empty(0)).device
        self.register_buffer("shift", torch.zeros(features, device=device) if shift else None)
        self.register_buffer("smooth", torch.ones(features, device=device) if smooth else None)
        self.rotate = rotate

    @property
    def in_features(self) -> int:
        return in_features(self.linear)

    @property
    def out_features(self) -> int:
        return out_features(self.linear)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, for model code that reaches through a module to it (GPT-2's `_init_weights`
        scales `c_proj.weight` when a checkpoint loads)."""
        return self.linear.weight

    def spec(self) -> dict[str, Any]:
        """What `from_pretrained` needs to rebuild this op before loading its buffers."""
        return {"kind": KIND, "shift": self.shift is not None, "smooth": self.smooth is not None, "rotate": self.rotate}

    @classmethod
    def from_spec(cls, linear: nn.Module, spec: dict[str, Any]) -> InputTransform:
        return cls(linear, shift=spec["shift"], smooth=spec["smooth"], rotate=spec["rotate"])

    def clear_channel_ops(self) -> None:
        """Drops the shift and smooth (folded elsewhere, e.g. into the norm in front); the buffers stay registered
        as None, so they are neither saved nor applied, and `spec()` records their absence."""
        self.shift = None
        self.smooth = None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotate:
            x = rotate(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.transform_input(x))

    def extra_repr(self) -> str:
        ops = [
            op
            for op, on in (
                ("shift", self.shift is not None),
                ("smooth", self.smooth is not None),
                ("hadamard", self.rotate),
            )
            if on
        ]
        return "ops=" + "+".join(ops)


def wrap(parent: nn.Module, child_name: str) -> InputTransform:
    """The InputTransform at `parent.child_name`, wrapping the Linear there first if needed."""
    child = getattr(parent, child_name)
    if isinstance(child, InputTransform):
        return child
    if not isinstance(child, (nn.Linear, Conv1D)):
        raise TypeError(f"An input transform wraps an nn.Linear or Conv1D; {child_name!r} is a {type(child).__name__}.")
    op = InputTransform(child)
    setattr(parent, child_name, op)
    return op


@torch.no_grad()
def add_shift_smooth(op: InputTransform, shift: torch.Tensor | None, smooth: torch.Tensor | None) -> None:
    """Composes x -> (x − shift) / smooth in front of what `op` already does (before any rotation), folding the
    inverse into the Linear. Must run before `add_rotation` on the same op."""
    if op.rotate:
        raise RuntimeError("Channel shift/scale must be applied before the rotation of the same input.")
    linear = op.linear
    weight = matrix(linear)
    old_smooth = op.smooth if op.smooth is not None else torch.ones_like(weight[0])
    if shift is not None:  # in the original input's units; the old shift and smooth come first
        delta = shift.to(weight) if op.shift is None else shift.to(weight) - op.shift
        # y = W·x + b with x = x_old_transformed·old_smooth + old_shift: a further shift δ moves W·δ into the bias
        bias_add = (weight / old_smooth.unsqueeze(0)) @ delta  # the original W
        if linear.bias is None:
            linear.bias = nn.Parameter(
                torch.zeros(op.out_features, dtype=weight.dtype, device=weight.device), requires_grad=False
            )
        linear.bias.add_(bias_add)
        op.shift = shift.to(weight).clone()
    if smooth is not None:
        new_smooth = smooth.to(weight)
        weight.mul_((new_smooth / old_smooth).unsqueeze(0))
        op.smooth = new_smooth.clone()


@torch.no_grad()
def add_rotation(op: InputTransform) -> None:
    """x -> x·R after the op's shift/smooth; the Linear's weight becomes W·R."""
    if op.rotate:
        return
    weight = matrix(op.linear)  # [out, in] (a view for Conv1D): W -> W·R
    weight.copy_((weight.double() @ hadamard(op.in_features, torch.float64, weight.device)).to(weight.dtype))
    op.rotate = True
