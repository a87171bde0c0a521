"""GGUF block encodings of hf_qlimit's weight grids: the same codes and scales, laid out as llama.cpp reads them.

hf_qlimit stores unsigned codes q in [0, 2^b − 1] with w = (q − z)·s, one (s, z) per row and group. GGUF's legacy
types hold blocks of 32 weights with one fp16 scale d (and offset m) each, so a group of 32k weights is k blocks
sharing its (d, m), and the codes carry over unchanged:

- Q4_0: d·(q − 8), q in [0, 15]: a symmetric 4-bit grid (z = 8 in every group), d = s.
- Q4_1: d·q + m: any 4-bit grid, d = s and m = −s·z.
- Q5_0: d·(q − 16), q in [0, 31]: a symmetric 5-bit grid (z = 16).
- Q5_1: d·q + m: any 5-bit grid.
- Q8_0: d·c, c = q − 128 in [−128, 127]: a symmetric 8-bit grid (z = 128). GGUF has no 8-bit type with an offset.

Byte layout of a block (little-endian): d (fp16), m (fp16, the "_1" types), qh (the 5-bit types: bit i of a
uint32 is bit 4 of code i), then 16 bytes whose low nibbles hold codes 0-15 and high nibbles codes 16-31 (Q8_0:
the 32 signed bytes). The values equal hf_qlimit's up to the fp16 rounding of d and m. Symmetric means the grid
as it stands (every zero at the middle code), as ct_format.py reads it. Other grids (2, 3, 6, 7 bits, 8-bit
asymmetric, groups or rows that do not split into blocks of 32) and MoE expert weights get no encoding: the
exporter writes them as float32 with their exact values. Which grid maps where, and why not:
quantizers/gguf_types.py (`gguf_choice`, re-exported here), which config checks can import too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..nn.embedding import QuantEmbedding
from ..nn.modules import QuantLinear
from ..nn.packing import unpack_codes
from ..quantizers.chunks import row_slices
from ..quantizers.gguf_types import BLOCK, GGUFChoice, gguf_choice, gguf_type_for
from .gguf_bytes import fp16_bytes, pack_bits
from .gguf_kquants import encode_kquant

__all__ = ["GGUFChoice", "encode_blocks", "encode_quantized", "gguf_choice", "gguf_type_for", "module_gguf_choice"]

FP16_MAX = float(torch.finfo(torch.float16).max)


def module_gguf_choice(module: nn.Module) -> GGUFChoice:
    """`gguf_choice` for a frozen quantized module's grid as it stands: its zeros decide whether it is symmetric,
    and a scale (or offset) beyond fp16's range has no exact encoding."""
    if not isinstance(module, (QuantLinear, QuantEmbedding)):
        return GGUFChoice(None, f"a {type(module).__name__} has no GGUF block encoding")
    quantizer = module.weight_quantizer
    bits, cols = quantizer.bits, module.cols
    symmetric = bool((quantizer.zero == 2 ** (bits - 1)).all())
    choice = gguf_choice(bits, cols // quantizer.scale.shape[1], symmetric, cols)
    if choice.type_name is None:
        return choice
    scale = quantizer.scale.detach().float()
    offset = scale * quantizer.zero.float()  # |m|, stored by the asymmetric types only
    if scale.abs().max() > FP16_MAX or (not symmetric and offset.max() > FP16_MAX):
        return GGUFChoice(None, "a scale or offset beyond float16's range")
    return choice


def encode_quantized(module: nn.Module) -> tuple[str, np.ndarray] | None:
    """(GGUF type name, (rows, bytes) uint8) of a quantized module whose grid maps onto a GGUF type exactly, else
    None (`module_gguf_choice` says why)."""
    if (kquant := encode_kquant(module)) is not None:  # a k-quant grid: its own layouts (gguf_kquants.py)
        return kquant
    kind = module_gguf_choice(module).type_name
    if kind is None:
        return None
    quantizer = module.weight_quantizer
    bits, rows, cols = quantizer.bits, module.rows, module.cols
    per_block = cols // quantizer.scale.shape[1] // BLOCK  # a group's (d, m) repeated over its blocks
    packed = module.packed_weight().reshape(rows, -1).cpu()  # once: rebuilt from a kernel's layout if held there
    parts = []
    for chunk in row_slices(rows, cols):  # a slab at a time: a vocabulary's int16 temporaries would be GBs
        codes = unpack_codes(packed[chunk], bits, cols).reshape(-1, cols // BLOCK, BLOCK)
        scale = quantizer.scale[chunk].detach().float().cpu().repeat_interleave(per_block, dim=1)
        zero = quantizer.zero[chunk].cpu().float().repeat_interleave(per_block, dim=1)
        fields = encode_blocks(kind, codes, scale, zero)
        parts.append(np.concatenate(fields, axis=-1).reshape(codes.shape[0], -1))
    return kind, np.concatenate(parts)


def encode_blocks(kind: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> list[np.ndarray]:
    """The byte fields of GGUF `kind` blocks, each (rows, blocks, bytes) uint8, in their order within a block.
    `codes`: (rows, blocks, 32) uint8 hf_qlimit codes; `scale`, `zero`: (rows, blocks) float, one per block."""
    rows, blocks = scale.shape
    flat = codes.numpy().reshape(-1, BLOCK)
    fields = [fp16_bytes(scale.reshape(-1, 1).numpy())]
    if kind == "Q8_0":
        fields.append((flat.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    if kind in ("Q4_1", "Q5_1"):
        fields.append(fp16_bytes((-scale * zero).reshape(-1, 1).numpy()))
    if kind in ("Q5_0", "Q5_1"):
        fields.append(pack_bits((flat >> 4) & 1, BLOCK // 8, 8, 1))  # qh: bit i of a uint32 is bit 4 of code i
    if kind != "Q8_0":
        fields.append(pack_bits(flat & 0x0F, 1, 2, 4))  # codes 0-15 in the low nibbles, 16-31 in the high ones
    return [field.reshape(rows, blocks, -1) for field in fields]
