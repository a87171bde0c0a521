"""GGUF k-quant encodings (Q2_K ... Q6_K) of modules quantized on a k-quant grid (quantizers/kquant.py): the
codes, sub-block multipliers and super-block steps hf_qlimit holds, laid out byte for byte as gguf-py's
dequantizers (gguf/quants.py) and llama.cpp's ggml-quants.c read them. Nothing is rounded here: the grid was
snapped to the format when it was built, so llama.cpp computes the weights hf_qlimit did.

A super-block of 256 weights (w_i, i = 0..255, codes q_i) is, by type, in this byte order (little-endian):

- Q2_K (84):  scales[16] = l | m << 4 per sub-block of 16;  qs[64];  d, dmin (fp16)
- Q3_K (110): hmask[32] (bit 2 of q_i: bit i // 32 of byte i % 32);  qs[64] (bits 0-1);  scales[12] (6-bit
  l + 32);  d
- Q4_K (144): d, dmin;  scales[12] (6-bit l and m of 8 sub-blocks of 32);  qs[128] (4-bit q)
- Q5_K (176): d, dmin;  scales[12];  qh[32] (bit 4 of q_i: bit i // 32 of byte i % 32);  qs[128] (bits 0-3)
- Q6_K (210): ql[128] (bits 0-3);  qh[64] (bits 4-5);  scales[16] (int8 l);  d

2-bit fields (qs of Q2_K / Q3_K, qh of Q6_K) hold, in each 128-weight half, weight 32k + b in bits 2k of byte b;
4-bit fields hold weight 32·(2c) + b in the low and 32·(2c + 1) + b in the high nibble of byte 32c + b (Q6_K's
ql: halves of 128 split into 64 + 64 alike).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..nn.embedding import QuantEmbedding
from ..nn.modules import QuantLinear
from ..quantizers.chunks import row_slices
from ..quantizers.formats import gguf_type_name
from ..quantizers.kquant import SUPER_BLOCK, KQuantizer
from .gguf_bytes import fp16_bytes, pack_bits

__all__ = ["encode_kquant"]


def encode_kquant(module: nn.Module) -> tuple[str, np.ndarray] | None:
    """(GGUF type name, (rows, bytes per row) uint8) of a frozen module on a k-quant grid, else None."""
    quantizer = getattr(module, "weight_quantizer", None)
    if not isinstance(module, (QuantLinear, QuantEmbedding)) or not isinstance(quantizer, KQuantizer):
        return None
    kind, rows, cols = gguf_type_name(quantizer.weight_format), module.rows, module.cols
    parts = []
    for chunk in row_slices(rows, cols):  # a slab of rows at a time: a vocabulary's temporaries would be GBs
        codes = module.code_rows(chunk).cpu().numpy().reshape(-1, SUPER_BLOCK)
        fields = _super_block_fields(quantizer, chunk, codes.shape[0])
        blocks = ENCODERS[kind](codes, *fields)
        parts.append(blocks.reshape(chunk.stop - chunk.start, -1))
    return kind, np.concatenate(parts)


def _super_block_fields(quantizer: KQuantizer, rows: slice, blocks: int) -> list[np.ndarray]:
    """(d, l) and, for the types with offsets, (dmin, m) of `rows`, one row of each per super-block."""
    fields = [quantizer.super_scale[rows], quantizer.sub_scale[rows]]
    if not quantizer.symmetric:
        fields += [quantizer.super_min[rows], quantizer.sub_min[rows]]
    return [f.detach().cpu().numpy().reshape(blocks, -1) for f in fields]


def _six_bit_pairs(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The 12 bytes of Q4_K / Q5_K's eight 6-bit (l, m): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (l) and
    4-7 (m); sub-blocks 4-7 with their low 4 bits in bytes 8-11 (l low nibble, m high) and top 2 bits in bits
    6-7 of bytes 0-3 (l) and 4-7 (m)."""
    sc, m = scales.astype(np.uint8), mins.astype(np.uint8)
    low = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6], axis=1)
    return np.concatenate([low, (sc[:, 4:] & 0x0F) | (m[:, 4:] & 0x0F) << 4], axis=1)


def _q2_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray, m: np.ndarray) -> np.ndarray:
    scales = sc.astype(np.uint8) | m.astype(np.uint8) << 4
    return np.concatenate([scales, pack_bits(codes, 2, 4, 2), fp16_bytes(d), fp16_bytes(dmin)], axis=1)


def _q3_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    stored = (sc.astype(np.int16) + 32).astype(np.uint8)  # l in [−32, 31] as 6 bits
    low = stored & 0x0F
    scales = np.concatenate([low[:, :8] | low[:, 8:] << 4, pack_bits(stored >> 4, 1, 4, 2)], axis=1)
    hmask = pack_bits(codes >> 2, 1, 8, 1)
    return np.concatenate([hmask, pack_bits(codes & 3, 2, 4, 2), scales, fp16_bytes(d)], axis=1)


def _q4_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), _six_bit_pairs(sc, m), pack_bits(codes, 4, 2, 4)], axis=1)


def _q5_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray, m: np.ndarray) -> np.ndarray:
    high = pack_bits(codes >> 4, 1, 8, 1)
    return np.concatenate(
        [fp16_bytes(d), fp16_bytes(dmin), _six_bit_pairs(sc, m), high, pack_bits(codes & 0x0F, 4, 2, 4)], axis=1
    )


def _q6_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    signed = sc.astype(np.int8).view(np.uint8)
    return np.concatenate(
        [pack_bits(codes & 0x0F, 2, 2, 4), pack_bits(codes >> 4, 2, 4, 2), signed, fp16_bytes(d)], axis=1
    )


ENCODERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
