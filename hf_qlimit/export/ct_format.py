"""One quantized matrix in the compressed-tensors format: its config-group scheme and its tensors.

The format's integer weights are signed codes c in [−2^(b−1), 2^(b−1) − 1], w = (c − zp)·s, stored as c + 2^(b−1):
that is exactly hf_qlimit's unsigned code q (and zp + 2^(b−1) is hf_qlimit's zero point z), so no value is
re-rounded. `pack-quantized` packs codes densely, LSB first, into little-endian int32 words per row of a
multiple of 32 codes, which is hf_qlimit's byte packing viewed as int32; asymmetric zero points are packed the
same way along the output rows. `int-quantized` (W8A8) stores int8 codes and a static per-tensor input scale
(with an int8 input zero point when the activation grid is asymmetric), or, for per-token inputs
(`act_dynamic`), nothing for the input: the format's dynamic "token" strategy computes each token's grid from its
min and max at run time, as hf_qlimit's `DynamicTokenQuantizer` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from ..nn.modules import QuantWeightMixin
from ..nn.packing import pack_codes
from ..quantizers import ActQuantizer
from ..quantizers.act_grids import DynamicTokenQuantizer
from .common import ExportError

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Scheme:
    """What one config group of the exported `quantization_config` says; matrices that share it share a group."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    act_symmetric: bool | None  # None: weight-only
    act_dynamic: bool = False  # per-token input grids computed at run time

    @property
    def format(self) -> str:
        return "pack-quantized" if self.act_symmetric is None else "int-quantized"

    @property
    def needs_dequantize(self) -> bool:
        """transformers cannot keep asymmetric packed weights compressed (its zero-point shapes disagree with the
        packed ones): it has to dequantize them at load."""
        return self.format == "pack-quantized" and not self.symmetric

    def to_dict(self, targets: list[str]) -> dict[str, Any]:
        weights = {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": "channel" if self.group_size is None else "group",
            "dynamic": False,
        }
        inputs = None
        if self.act_symmetric is not None:
            inputs = {
                "num_bits": 8,
                "type": "int",
                "symmetric": self.act_symmetric,
                "group_size": None,
                "strategy": "token" if self.act_dynamic else "tensor",
                "dynamic": self.act_dynamic,
            }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": self.format,
        }


def scheme_of(name: str, weight: QuantWeightMixin, act: ActQuantizer | None, allow_unservable: bool) -> Scheme:
    """The scheme of a frozen quantized matrix `weight` whose input goes through `act` (None: weight-only)."""
    quantizer = weight.weight_quantizer
    if not quantizer.plain_grid:
        raise ExportError(
            f"{name}: a GGUF k-quant grid with a float offset per sub-block ({quantizer.extra_repr()}), which "
            "compressed-tensors cannot store; export it with format='gguf'."
        )
    bits, groups = quantizer.bits, quantizer.scale.shape[1]
    symmetric = bool((quantizer.zero == 2 ** (bits - 1)).all())
    if not symmetric and bits not in (4, 8):
        message = (
            f"{name}: asymmetric {bits}-bit weights. compressed-tensors can store them, but vLLM's kernels (by its docs) "
            "take asymmetric weights only at 4 and 8 bits; quantize with `weight_sym=True` at 2 or 3 bits"
        )
        if not allow_unservable:
            raise ExportError(message + ", or pass allow_unservable=True (--allow_unservable) to export anyway.")
        logger.warning_once(message + ". Exported anyway (allow_unservable).")
    dynamic = isinstance(act, DynamicTokenQuantizer)
    if act is None:
        act_symmetric = None
    elif bits == 8 and act.bits == 8:
        act_symmetric = act.symmetric if dynamic else round(float(act.zero)) == 128
    else:
        raise ExportError(
            f"{name}: W{bits}A{act.bits}. compressed-tensors expresses static activation quantization here only as "
            "W8A8 (`int-quantized`); export a weight-only model (act_bits=None) or a W8A8 one."
        )
    group_size = None if groups == 1 else weight.cols // groups
    return Scheme(bits, group_size, symmetric, act_symmetric, dynamic)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of unsigned codes (rows, n): rows padded to 32 codes, int32 words."""
    n = codes.shape[1]
    padded = -(-n // 32) * 32
    if padded > n:
        codes = torch.nn.functional.pad(codes, (0, padded - n))
    words = pack_codes(codes, bits).contiguous().view(torch.int32)
    return words[:, : -(-n * bits // 32)].contiguous()


def matrix_tensors(
    prefix: str,
    weight: QuantWeightMixin,
    scheme: Scheme,
    act: ActQuantizer | None = None,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the Linear `prefix` in `scheme`: `weight`'s rows (only `rows`, an index tensor, for one
    expert of a fused weight), and the static input grid of `act` (int-quantized)."""
    quantizer = weight.weight_quantizer
    bits, cols = quantizer.bits, weight.cols
    codes = weight.code_rows(rows).cpu()
    picked = slice(None) if rows is None else rows
    scale = quantizer.scale[picked].detach().float().cpu()
    zero = quantizer.zero[picked].cpu()
    out: dict[str, torch.Tensor] = {f"{prefix}.weight_scale": scale.contiguous()}
    offset = 2 ** (bits - 1)
    if scheme.format == "pack-quantized":
        out[f"{prefix}.weight_packed"] = pack_int32(codes, bits)
        out[f"{prefix}.weight_shape"] = torch.tensor([codes.shape[0], cols], dtype=torch.int64)
        if not scheme.symmetric:  # packed along the output rows
            out[f"{prefix}.weight_zero_point"] = pack_int32(zero.t().contiguous(), bits).t().contiguous()
    else:
        out[f"{prefix}.weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        if not scheme.symmetric:
            out[f"{prefix}.weight_zero_point"] = (zero.to(torch.int16) - offset).to(torch.int8)
    if scheme.format == "int-quantized" and not scheme.act_dynamic:
        out[f"{prefix}.input_scale"] = act.scale.detach().float().reshape(1).cpu()
        if not scheme.act_symmetric:
            out[f"{prefix}.input_zero_point"] = torch.tensor([round(float(act.zero)) - 128], dtype=torch.int8)
    bias = getattr(weight, "bias", None)
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().cpu().contiguous()
    return out
