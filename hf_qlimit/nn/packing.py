"""Bit packing of integer codes: each row of b-bit codes becomes ceil(in · b / 8) bytes."""

from __future__ import annotations

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    return (in_features * bits + 7) // 8


BIT_CHUNK = 1 << 22  # bits per chunk on the generic path: its bit map holds one byte per bit


def _whole_codes_per_byte(n: int, bits: int) -> int | None:
    """Codes per byte when they tile bytes exactly (2, 4, 8 bits and a fitting row): no bit map needed."""
    per = 8 // bits
    return per if 8 % bits == 0 and n % per == 0 else None


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) uint8 codes < 2**bits -> (rows, ceil(n·bits/8)) uint8, bits laid out LSB first."""
    rows, n = codes.shape
    per = _whole_codes_per_byte(n, bits)
    if per is not None:
        grouped = codes.reshape(rows, n // per, per)
        out = grouped[..., 0].clone()
        for k in range(1, per):
            out |= grouped[..., k] << (k * bits)
        return out
    step = max(1, BIT_CHUNK // max(1, n * bits))  # rows at a time: the bit map of a whole embedding is GBs
    return torch.cat([_pack_bitmap(codes[i : i + step], bits) for i in range(0, rows, step)])


def _pack_bitmap(codes: torch.Tensor, bits: int) -> torch.Tensor:
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
    per = _whole_codes_per_byte(n, bits)
    if per is not None:
        mask = (1 << bits) - 1
        return torch.stack([(packed >> (k * bits)) & mask for k in range(per)], dim=-1).reshape(rows, n)
    step = max(1, BIT_CHUNK // max(1, n * bits))
    return torch.cat([_unpack_bitmap(packed[i : i + step], bits, n) for i in range(0, rows, step)])


def _unpack_bitmap(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bitmap = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : n * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (bitmap.reshape(rows, n, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
