"""Byte packing shared by the GGUF block (gguf_blocks.py) and k-quant (gguf_kquants.py) encodings."""

from __future__ import annotations

import numpy as np


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(n, k) floats -> (n, 2k) bytes: each value as little-endian fp16, the way GGUF stores d and m."""
    half = np.asarray(values, dtype=np.float32).astype("<f2")
    return half.view(np.uint8).reshape(half.shape[0], -1)


def pack_bits(values: np.ndarray, runs: int, parts: int, width: int) -> np.ndarray:
    """(n, k) values < 2**width -> (n, k·width/8) bytes: each row's k values form `runs` runs of `parts` spans,
    and byte b of a run holds span p's value b in bits p·width onwards."""
    n, k = values.shape
    spans = values.astype(np.uint8).reshape(n, runs, parts, k // (runs * parts))
    shifts = (np.arange(parts, dtype=np.uint8) * width).reshape(1, 1, parts, 1)
    return np.bitwise_or.reduce(spans << shifts, axis=2).reshape(n, -1)
