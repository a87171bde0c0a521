"""Bit packing of integer codes: each row of b-bit codes becomes ceil(in · b / 8) bytes."""

from __future__ import annotations

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    return (in_features * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) uint8 codes < 2**bits -> (rows, ceil(n·bits/8)) uint8, bits laid out LSB first."""
    rows, n = codes.shape
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bitmap = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    pad = (-bitmap.shape[1]) % 8
    if pad:
        bitmap = torch.nn.functional.pad(bitmap, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (bitmap.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes` for rows of `n` codes."""
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bitmap = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : n * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (bitmap.reshape(rows, n, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
