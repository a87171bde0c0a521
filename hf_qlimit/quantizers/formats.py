"""Weight formats: grids fixed by the file format a model is meant for (`QLimitConfig(weight_format=...)`).

A GGUF type fixes bits, symmetry and block size, so quantizing on its grid makes the export lossless:
llama.cpp then runs the very codes reconstruction chose. The k-quants (`*_k`) add super-blocks of 256 whose
sub-block scales are themselves quantized; their grid is `quantizers/kquant.py`'s.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Format(NamedTuple):
    bits: int
    symmetric: bool
    group: int  # weights per scale: a GGUF block, or a k-quant sub-block
    super_block: int | None = None  # k-quants: weights per super-block (its row length must divide into it)


GGUF_FORMATS: dict[str, Format] = {
    "gguf:q4_0": Format(4, True, 32),
    "gguf:q4_1": Format(4, False, 32),
    "gguf:q5_0": Format(5, True, 32),
    "gguf:q5_1": Format(5, False, 32),
    "gguf:q8_0": Format(8, True, 32),
    "gguf:q2_k": Format(2, False, 16, 256),
    "gguf:q3_k": Format(3, True, 16, 256),
    "gguf:q4_k": Format(4, False, 32, 256),
    "gguf:q5_k": Format(5, False, 32, 256),
    "gguf:q6_k": Format(6, True, 16, 256),
}
# The format the embedding and head take at `first_last_bits` under a GGUF weight format: llama.cpp's own
# choice for them (Q8_0 at 8 bits), the symmetric block type at 4-5, k-quants where no block type exists.
GGUF_FOR_BITS = {8: "gguf:q8_0", 6: "gguf:q6_k", 5: "gguf:q5_0", 4: "gguf:q4_0", 3: "gguf:q3_k", 2: "gguf:q2_k"}

# Rows whose length does not split into super-blocks of 256 take the 32-block type llama.cpp's quantizer falls
# back to (llama-quant.cpp, `tensor_type_fallback`); one that does not split into blocks of 32 either is refused.
KQUANT_FALLBACK = {
    "gguf:q2_k": "gguf:q4_0",
    "gguf:q3_k": "gguf:q4_0",
    "gguf:q4_k": "gguf:q5_0",
    "gguf:q5_k": "gguf:q5_1",
    "gguf:q6_k": "gguf:q8_0",
}


def fitting_format(weight_format: str, cols: int | None) -> str:
    """`weight_format`, or llama.cpp's fallback type where rows of `cols` weights do not split into its
    super-blocks (`cols` None: not known, the format stays)."""
    super_block = GGUF_FORMATS[weight_format].super_block
    if super_block is None or cols is None or cols % super_block == 0:
        return weight_format
    return KQUANT_FALLBACK[weight_format]


def is_gguf(weight_format: str | None) -> bool:
    return isinstance(weight_format, str) and weight_format.startswith("gguf:")


def has_offsets(weight_format: str) -> bool:
    """Whether the grid adds a float offset per sub-block (Q2_K, Q4_K, Q5_K): GGUF stores it, compressed-tensors
    and hf_qlimit's kernels have no slot for it."""
    fmt = GGUF_FORMATS[weight_format]
    return fmt.super_block is not None and not fmt.symmetric


def gguf_type_name(weight_format: str) -> str:
    """The GGUF type a format's grid is written in, as gguf-py's GGMLQuantizationType spells it ("Q4_K")."""
    return weight_format.removeprefix("gguf:").upper()


def format_spec(weight_format: str) -> dict[str, Any]:
    """The layer-config entries (weight bits, group, symmetry, format) a module quantized in `weight_format` gets."""
    fmt = GGUF_FORMATS[weight_format]
    return {"w": fmt.bits, "group": fmt.group, "sym": fmt.symmetric, "format": weight_format}
