"""Batch-1 decode matmuls of an OPT-1.3b-shaped model, one thread: dense fp32 `F.linear` against hf_qlimit's
packed kernels (int4 g64 for the blocks' Linears, int8 g64 for the head), and their sum per token.

A cheap proxy for the deploy benchmark's OPT-1.3b decode target (>= 2x FP32) when the full run (a 5 GB random
model, its quantization, minutes per repetition) does not fit; attention, norms and sampling are left out.

    python -m benchmarks.deploy.decode_shapes

It prints its figures only (no doc page holds them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from hf_qlimit.nn import kernels
from hf_qlimit.nn.packing import pack_codes

# (name, rows, cols, bits, Linears per block); 24 blocks, one head (vocabulary 50272)
SHAPES = [
    ("q/k/v/out", 2048, 2048, 4, 4),
    ("fc1", 8192, 2048, 4, 1),
    ("fc2", 2048, 8192, 4, 1),
    ("head", 50272, 2048, 8, 1),
]
BLOCKS, GROUP = 24, 64


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    total_fp = total_packed = 0.0
    for name, rows, cols, bits, per_block in SHAPES:
        reps = 5 if name == "head" else 20
        x = torch.randn(1, cols, generator=g)
        weight = torch.randn(rows, cols, generator=g) * 0.02
        fp = best_ms(partial(F.linear, x, weight), reps)
        del weight
        codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=g)
        scale = torch.rand(rows, cols // GROUP, generator=g) * 0.01
        zero = torch.randint(0, 2**bits, scale.shape, dtype=torch.uint8, generator=g)
        packed = pack_codes(codes, bits).reshape(-1)
        if bits == 4:
            w4, sz = kernels.prepare_int4(packed, scale, zero, cols, GROUP)
            q = best_ms(partial(kernels.int4_linear, x, w4, sz, GROUP, rows), reps)
        else:
            w8, scales, offset = kernels.prepare_int8(packed, scale, zero, cols, GROUP)
            q = best_ms(partial(kernels.int8_linear, x, w8, scales, offset), reps)
        count = per_block * (BLOCKS if name != "head" else 1)
        total_fp, total_packed = total_fp + fp * count, total_packed + q * count
        print(f"{name:9s} {rows}x{cols}: fp32 {fp:.3f} ms, packed W{bits} {q:.3f} ms ({fp / q:.2f}x)", flush=True)
    print(
        f"per token ({BLOCKS} blocks + head, matmuls only): fp32 {total_fp:.0f} ms, packed {total_packed:.0f} ms "
        f"({total_fp / total_packed:.2f}x)"
    )


if __name__ == "__main__":
    main()
