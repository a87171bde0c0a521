"""Hadamard rotations at Linear inputs (QuaRot): outliers spread over all channels of the token.

An online rotation is an explicit op (nothing folds through GELU/SiLU, or through a LayerNorm whose output
also feeds a residual): the input is multiplied by R at run time and the Linear holds W·R.
"""

from __future__ import annotations

from .input_op import InputTransform, add_rotation


def rotate_inputs(ops: list[InputTransform]) -> None:
    for op in ops:
        add_rotation(op)
