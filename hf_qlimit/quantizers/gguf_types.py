"""Which GGUF type holds a weight grid exactly, and why none does: for the GGUF exporter (export/gguf_blocks.py)
and for checks that run before a model exists (this module imports nothing heavy, no exporter).

GGUF's legacy types store blocks of 32 weights with one fp16 scale (and offset) each, so a grid maps when its
group (or row, one scale per row) is a multiple of 32 and its bits and symmetry have a type: Q4_0 / Q5_0 / Q8_0
for symmetric 4-, 5- and 8-bit grids (zero point at the middle code), Q4_1 / Q5_1 for any 4- and 5-bit grid.
"""

from __future__ import annotations

from typing import NamedTuple

from .formats import GGUF_FORMATS, gguf_type_name

BLOCK = 32  # weights per GGUF block


def block_types(symmetric: bool) -> dict[int, str]:
    """bits -> the GGUF block type (no super-blocks) of that symmetry, read off `formats.GGUF_FORMATS`."""
    return {
        fmt.bits: gguf_type_name(name)
        for name, fmt in GGUF_FORMATS.items()
        if fmt.super_block is None and fmt.symmetric == symmetric
    }


SYMMETRIC_TYPES, ASYMMETRIC_TYPES = block_types(True), block_types(False)


class GGUFChoice(NamedTuple):
    """The GGUF type a grid maps onto exactly (None: written as float32) and why, for a log or error message."""

    type_name: str | None
    reason: str


def gguf_choice(bits: int, group_size: int | None, symmetric: bool, cols: int) -> GGUFChoice:
    """The GGUF type of a `bits`-bit grid over rows of `cols` weights, one scale per `group_size` weights (None,
    or a group as long as the row: one per row), and the reason it has none where it has none."""
    per_row = group_size is None or group_size >= cols
    group = cols if per_row else group_size
    if bits not in SYMMETRIC_TYPES:
        return GGUFChoice(None, f"{bits}-bit grids have no GGUF block type (4-, 5- and symmetric 8-bit grids have)")
    if bits == 8 and not symmetric:
        return GGUFChoice(None, "8-bit asymmetric has no GGUF type: use weight_sym=True (a symmetric 8-bit grid)")
    if per_row and cols % BLOCK:
        return GGUFChoice(None, f"row length {cols} is not a multiple of GGUF's blocks of {BLOCK}")
    if group < BLOCK:
        return GGUFChoice(None, f"group {group} is smaller than GGUF's blocks of {BLOCK}")
    if group % BLOCK:
        return GGUFChoice(None, f"group {group} is not a multiple of GGUF's blocks of {BLOCK}")
    if cols % group:
        return GGUFChoice(None, f"group {group} does not divide the row length {cols}")
    name = (SYMMETRIC_TYPES if symmetric else ASYMMETRIC_TYPES)[bits]
    kind = "symmetric" if symmetric else "asymmetric"
    return GGUFChoice(name, f"{bits}-bit {kind} grid, {'one scale per row' if per_row else f'groups of {group}'}")


def gguf_type_for(bits: int, group_size: int | None, symmetric: bool, cols: int) -> str | None:
    """The GGUF type name of a grid (`gguf_choice` also says why not), or None."""
    return gguf_choice(bits, group_size, symmetric, cols).type_name
