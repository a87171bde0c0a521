"""Export to the `compressed-tensors` format, which plain transformers (with the `compressed-tensors` package)
loads without hf_qlimit; it is the format vLLM reads (not tried with vLLM here).

The format's integer weights are signed codes c in [−2^(b−1), 2^(b−1) − 1], w = (c − zp)·s, stored as c + 2^(b−1):
that is exactly hf_qlimit's unsigned code q (and zp + 2^(b−1) is hf_qlimit's zero point z), so no value is
re-rounded. `pack-quantized` packs codes densely, LSB first, into little-endian int32 words per row of a
multiple of 32 codes, which is hf_qlimit's byte packing viewed as int32; asymmetric zero points are packed the
same way along the output rows. `int-quantized` (W8A8) stores int8 codes and a static per-tensor input scale
(with an int8 input zero point when the activation grid is asymmetric).

What it cannot express is refused with an `ExportError` that says what to change.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..hf.surgery import OUTPUT_QUANTIZER
from ..nn.modules import QuantEmbedding, QuantLinear
from ..nn.packing import pack_codes, unpack_codes
from .common import ExportError, refuse_input_transforms

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class _Scheme:
    """What one config group of the exported `quantization_config` says; modules that share it share a group."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    act_symmetric: bool | None  # None: weight-only

    @property
    def format(self) -> str:
        return "pack-quantized" if self.act_symmetric is None else "int-quantized"

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
                "strategy": "tensor",
                "dynamic": False,
            }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": self.format,
        }


def _scheme(name: str, module: QuantLinear, allow_unservable: bool) -> _Scheme:
    quantizer = module.weight_quantizer
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
    act = module.input_quantizer
    if act is None:
        act_symmetric = None
    elif bits == 8 and act.bits == 8:
        act_symmetric = round(float(act.zero)) == 128
    else:
        raise ExportError(
            f"{name}: W{bits}A{act.bits}. compressed-tensors expresses static activation quantization here only as "
            "W8A8 (`int-quantized`); export a weight-only model (act_bits=None) or a W8A8 one."
        )
    group_size = None if groups == 1 else module.cols // groups
    return _Scheme(bits, group_size, symmetric, act_symmetric)


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of unsigned codes (rows, n): rows padded to 32 codes, int32 words."""
    n = codes.shape[1]
    padded = -(-n // 32) * 32
    if padded > n:
        codes = torch.nn.functional.pad(codes, (0, padded - n))
    words = pack_codes(codes, bits).contiguous().view(torch.int32)
    return words[:, : -(-n * bits // 32)].contiguous()


def _linear_tensors(prefix: str, module: QuantLinear, scheme: _Scheme) -> dict[str, torch.Tensor]:
    quantizer = module.weight_quantizer
    bits, rows, cols = quantizer.bits, module.rows, module.cols
    codes = unpack_codes(module.packed_weight().reshape(rows, -1).cpu(), bits, cols)
    scale = quantizer.scale.detach().float().cpu()
    zero = quantizer.zero.cpu()
    out: dict[str, torch.Tensor] = {f"{prefix}.weight_scale": scale.contiguous()}
    offset = 2 ** (bits - 1)
    if scheme.format == "pack-quantized":
        out[f"{prefix}.weight_packed"] = _pack_int32(codes, bits)
        out[f"{prefix}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if not scheme.symmetric:  # packed along the output rows
            out[f"{prefix}.weight_zero_point"] = _pack_int32(zero.t().contiguous(), bits).t().contiguous()
    else:
        out[f"{prefix}.weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        if not scheme.symmetric:
            out[f"{prefix}.weight_zero_point"] = (zero.to(torch.int16) - offset).to(torch.int8)
        act = module.input_quantizer
        out[f"{prefix}.input_scale"] = act.scale.detach().float().reshape(1).cpu()
        if not scheme.act_symmetric:
            out[f"{prefix}.input_zero_point"] = torch.tensor([round(float(act.zero)) - 128], dtype=torch.int8)
    if module.bias is not None:
        out[f"{prefix}.bias"] = module.bias.detach().cpu().contiguous()
    return out


def _refuse_unexpressible(model: nn.Module) -> None:
    from ..nn.attention import ATTENTION_ATTR

    attention = [name for name, m in model.named_modules() if getattr(m, ATTENTION_ATTR, None) is not None]
    if attention:
        raise ExportError(
            f"{len(attention)} attention modules quantize the inputs of their Q·Kᵀ and P·V matmuls (first: "
            f"{attention[0]!r}); compressed-tensors has no such quantizers. Quantize with `quantize_attention=False` "
            "(or weight-only) to export."
        )
    outputs = [name for name, m in model.named_modules() if getattr(m, OUTPUT_QUANTIZER, None) is not None]
    if outputs:
        raise ExportError(
            f"{len(outputs)} blocks quantize their outputs (act_layout='block_output', first: {outputs[0]!r}); "
            "compressed-tensors quantizes Linear inputs only. Quantize with another `act_layout` to export."
        )
    plan = getattr(getattr(model.config, "quantization_config", None), "layer_config", None) or {}
    kinds = {"conv1d": "GPT-2-style Conv1D layers", "experts": "fused MoE experts (3-D weights)"}
    for kind, what in kinds.items():
        names = [name for name, spec in plan.items() if spec.get("kind") == kind]
        if names:  # transformers would load neither into compressed-tensors' Linears: the weights would be dropped
            raise ExportError(
                f"{len(names)} quantized modules are {what} (first: {names[0]!r}); compressed-tensors export writes "
                f"Linears only. Keep them out with `modules_to_not_convert` to export."
            )


def _schemes(quantized: dict[str, nn.Module], allow_unservable: bool) -> tuple[dict[_Scheme, list[str]], list[str]]:
    """(scheme -> the Linears written packed on it, the modules written as float weights)."""
    groups: dict[_Scheme, list[str]] = {}
    for name, module in quantized.items():
        if isinstance(module, QuantLinear):
            groups.setdefault(_scheme(name, module, allow_unservable), []).append(name)
    dense = [n for n, m in quantized.items() if isinstance(m, QuantEmbedding)]
    if dense:
        logger.info(f"Quantized embeddings {dense} are written dequantized (compressed-tensors quantizes Linears).")
    if len(groups) > 1 and any(_needs_dequantize(scheme) for scheme in groups):
        # transformers dequantizes asymmetric packed weights at load with one scheme for every dense layer: keep
        # the largest group packed and write the others (e.g. an 8-bit head) as their exact float values.
        numel = {s: sum(quantized[n].rows * quantized[n].cols for n in names) for s, names in groups.items()}
        main = max(groups, key=numel.__getitem__)
        others = [n for s, names in groups.items() if s != main for n in names]
        logger.warning(
            f"{others} have another quantization scheme than the bulk of the model; transformers' loader "
            "reads one scheme per model when it dequantizes, so they are written as float weights (same values)."
        )
        dense += others
        groups = {main: groups[main]}
    return groups, dense


def export_compressed_tensors(model: nn.Module, out_dir: str | Path, allow_unservable: bool = False) -> Path:
    """Writes `config.json` and `model.safetensors` of `model` (a frozen hf_qlimit model) to `out_dir`."""
    if sys.byteorder != "little":
        raise ExportError("compressed-tensors' int32 packing is written little-endian; export on a little-endian host.")
    _refuse_unexpressible(model)
    refuse_input_transforms(model, "compressed-tensors")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    if not quantized:
        raise ExportError("The model has no hf_qlimit quantized modules: quantize it (or load a qlimit folder) first.")
    if any(not m.is_frozen for m in quantized.values()):
        raise ExportError("The model's quantization has not finished (some modules are not frozen).")
    groups, dense = _schemes(quantized, allow_unservable)
    tensors: dict[str, torch.Tensor] = {}
    for name in dense:
        tensors[f"{name}.weight"] = quantized[name].dequantize_rows().cpu().contiguous()
        if getattr(quantized[name], "bias", None) is not None:
            tensors[f"{name}.bias"] = quantized[name].bias.detach().cpu().contiguous()
    for scheme, names in groups.items():
        for name in names:
            tensors.update(_linear_tensors(name, quantized[name], scheme))
    prefixes = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value.detach().cpu().contiguous()
    formats = {scheme.format for scheme in groups}
    if len(formats) > 1:
        raise ExportError(
            f"The model mixes weight-only and activation-quantized Linears ({sorted(formats)}); "
            "export one kind per model."
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_dedupe(tensors), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = _quantization_config(groups, formats.pop())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)
    return out_dir


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): each key gets its own copy."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return out


def _needs_dequantize(scheme: _Scheme) -> bool:
    return scheme.format == "pack-quantized" and not scheme.symmetric


def _quantization_config(groups: dict[_Scheme, list[str]], fmt: str) -> dict[str, Any]:
    config_groups = {f"group_{i}": scheme.to_dict(names) for i, (scheme, names) in enumerate(groups.items())}
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
    }
    if any(_needs_dequantize(scheme) for scheme in groups):
        # transformers cannot keep asymmetric packed weights compressed (its zero-point shapes disagree with the
        # packed ones); it dequantizes them at load. vLLM, by its docs, ignores the key (not tried here).
        config["dequantize"] = True
    return config
