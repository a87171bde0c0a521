"""GGUF block encodings of hf_qlimit's weight grids: the codes and scales as llama.cpp stores them.

Q4_1 is 32 weights with value = d·q + m, q in [0, 15]: hf_qlimit's w = (q − z)·s with d = s and m = −s·z, the
same codes q. Q8_0 is value = d·c with c in [−128, 127]: a symmetric 8-bit grid (z = 128), c = q − 128.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..nn.modules import QuantLinear
from ..nn.packing import unpack_codes

BLOCK = 32


def encode_quantized(module: nn.Module) -> tuple[str, np.ndarray] | None:
    """(GGUF type name, (rows, bytes) uint8) of a quantized module whose grid maps onto a GGUF type exactly, else None."""
    if not isinstance(module, QuantLinear):
        return None
    quantizer = module.weight_quantizer
    bits, rows, cols = quantizer.bits, module.rows, module.cols
    group = cols // quantizer.scale.shape[1]
    if cols % BLOCK or group % BLOCK or bits not in (4, 8):
        return None
    codes = unpack_codes(module.packed_weight().reshape(rows, -1).cpu(), bits, cols).reshape(rows, -1, BLOCK)
    per_block = group // BLOCK  # (d, m) of a group repeated over its blocks
    scale = quantizer.scale.detach().float().cpu().repeat_interleave(per_block, dim=1)
    zero = quantizer.zero.cpu().float().repeat_interleave(per_block, dim=1)
    d = scale.half().numpy().view(np.uint8).reshape(rows, -1, 2)
    if bits == 4:
        m = (-scale * zero).half().numpy().view(np.uint8).reshape(rows, -1, 2)
        nibbles = (codes[..., :16] | (codes[..., 16:] << 4)).numpy()  # first half in the low nibbles
        return "Q4_1", np.concatenate([d, m, nibbles], axis=-1).reshape(rows, -1)
    if bool((quantizer.zero != 128).any()):
        return None  # Q8_0 has no offset
    signed = (codes.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
    return "Q8_0", np.concatenate([d, signed], axis=-1).reshape(rows, -1)
