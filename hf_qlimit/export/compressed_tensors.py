"""Export to the `compressed-tensors` format, which plain transformers (with the `compressed-tensors` package)
loads without hf_qlimit; it is the format vLLM reads (not tried with vLLM here).

Weight-only Linears are written `pack-quantized`, W8A8 ones `int-quantized` (ct_format.py: hf_qlimit's codes are
the format's, nothing is re-rounded); fused MoE experts as one Linear per expert (ct_experts.py); quantized
embeddings as their dequantized floats. Before writing, the folder's loading in transformers is checked on an
empty copy of the model (ct_loading.py). What the format or transformers' loader cannot express is refused with
an `ExportError` that names the model type, the module and what to change.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..hf.surgery import OUTPUT_QUANTIZER
from ..nn.embedding import QuantEmbedding
from ..nn.experts import QuantExperts
from ..nn.modules import QuantLinear
from . import ct_loading
from .common import ExportError, refuse_input_transforms
from .ct_experts import expert_matrices, expert_targets, refuse_unloadable
from .ct_format import Scheme, matrix_tensors, scheme_of

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "model.safetensors"
QUANTIZED = (QuantLinear, QuantEmbedding, QuantExperts)


@dataclass
class _Plan:
    """Which quantized module is written how."""

    groups: dict[Scheme, list[str]]  # config group -> the Linears and fused experts written in its format
    dense: list[str] = field(default_factory=list)  # written as their float (dequantized) weights
    dequantize: bool = False  # transformers is asked to dequantize at load


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
    layers = getattr(getattr(model.config, "quantization_config", None), "layer_config", None) or {}
    conv1d = [name for name, spec in layers.items() if spec.get("kind") == "conv1d"]
    if conv1d:
        raise ExportError(
            f"{model.config.model_type}: {len(conv1d)} quantized modules are transformers' Conv1D (first: "
            f"{conv1d[0]!r}), whose weight is stored [in, out]. compressed-tensors has no Conv1D layout: its scales "
            "and groups run along the last dimension of the stored weight (here the output one, not the input one "
            "hf_qlimit's groups run along), and transformers loads compressed-tensors weights into Linears only. "
            "Keep them out with `modules_to_not_convert`, or use hf_qlimit's own checkpoint (save_pretrained)."
        )


def _plan(model: nn.Module, modules: dict[str, nn.Module], allow_unservable: bool) -> _Plan:
    """Each Linear and fused experts module on its scheme; embeddings written as floats."""
    plan = _Plan(groups={}, dense=[n for n, m in modules.items() if isinstance(m, QuantEmbedding)])
    if plan.dense:
        logger.info(
            f"Quantized embeddings {plan.dense} are written dequantized (compressed-tensors quantizes Linears)."
        )
    for name, module in modules.items():
        if isinstance(module, QuantLinear):
            scheme = scheme_of(name, module, module.input_quantizer, allow_unservable)
        elif isinstance(module, QuantExperts):
            scheme = _experts_scheme(model, name, module, allow_unservable)
        else:
            continue
        plan.groups.setdefault(scheme, []).append(name)
    formats = {scheme.format for scheme in plan.groups}
    if len(formats) > 1:
        raise ExportError(
            f"The model mixes weight-only and activation-quantized Linears ({sorted(formats)}); "
            "export one kind per model."
        )
    plan.dequantize = any(scheme.needs_dequantize for scheme in plan.groups)
    return plan


def _experts_scheme(model: nn.Module, name: str, experts: QuantExperts, allow_unservable: bool) -> Scheme:
    weights = experts.expert_weights()
    schemes = {scheme_of(f"{name}.{param}", w, None, allow_unservable) for param, w in weights.items()}
    if len(schemes) != 1:
        raise ExportError(
            f"{model.config.model_type}: the fused weights of {name!r} have different grids ({schemes}); "
            "transformers loads one compressed-tensors scheme for all experts."
        )
    scheme = schemes.pop()
    refuse_unloadable(model, name, experts, scheme.symmetric)
    return scheme


def _check_loading(model: nn.Module, modules: dict[str, nn.Module], plan: _Plan, config: dict) -> None:
    """Packed Linears that transformers could not load compressed (ct_loading.py): tied ones are written as
    floats; where the family's weight init reads `.weight`, transformers is asked to dequantize at load."""
    if plan.dequantize or any(scheme.format != "pack-quantized" for scheme in plan.groups):
        return  # int-quantized Linears keep their `.weight` (int8)
    empty = ct_loading.skeleton(model, config)
    linears = [n for names in plan.groups.values() for n in names if isinstance(modules[n], QuantLinear)]
    tied = ct_loading.tied_modules(empty, linears)
    if tied:
        logger.warning(
            f"{model.config.model_type}: transformers ties {tied} on loading and needs their `.weight`; they are "
            "written as float weights (same values)."
        )
        plan.dense += tied
        plan.groups = {s: kept for s, names in plan.groups.items() if (kept := [n for n in names if n not in tied])}
    problem = ct_loading.init_reads_weight(empty, [n for n in linears if n not in tied])
    if problem:
        logger.warning(
            f"{model.config.model_type}: {problem}. The folder asks transformers to dequantize at load "
            "(`dequantize: true`): exact, but dense in memory there."
        )
        plan.dequantize = True


def _one_scheme(model: nn.Module, modules: dict[str, nn.Module], plan: _Plan) -> None:
    """Dequantizing at load, transformers reads one scheme for all dense layers: the largest group stays packed,
    the others (e.g. an 8-bit head) are written as their exact float values."""
    if not plan.dequantize or len(plan.groups) < 2:
        return
    numel = {s: sum(_numel(modules[n]) for n in names) for s, names in plan.groups.items()}
    main = max(plan.groups, key=numel.__getitem__)
    others = [n for s, names in plan.groups.items() if s != main for n in names]
    experts = [n for n in others if isinstance(modules[n], QuantExperts)]
    if experts:
        raise ExportError(
            f"{model.config.model_type}: the fused MoE experts {experts[0]!r} have another scheme than the bulk of "
            "the model, and transformers dequantizes compressed-tensors folders with one scheme for all layers. "
            "Quantize the experts with the same weight bits as the other Linears."
        )
    logger.warning(
        f"{others} have another quantization scheme than the bulk of the model; transformers' loader "
        "reads one scheme per model when it dequantizes, so they are written as float weights (same values)."
    )
    plan.dense += others
    plan.groups = {main: plan.groups[main]}


def _numel(module: nn.Module) -> int:
    if isinstance(module, QuantExperts):
        return sum(w.rows * w.cols for w in module.expert_weights().values())
    return module.rows * module.cols


def _tensors(model: nn.Module, modules: dict[str, nn.Module], plan: _Plan, config: dict) -> tuple[dict, dict]:
    """(the folder's tensors, module -> the Linears it is written as). Float keys keep the model's names, fused
    experts left in full precision too: transformers' loader gives nothing for per-expert float keys of a
    compressed-tensors folder."""
    packed: dict[str, torch.Tensor] = {}
    linears: dict[str, list[str]] = {}
    experts = any(isinstance(m, QuantExperts) for names in plan.groups.values() for m in map(modules.get, names))
    empty = ct_loading.skeleton(model, config) if experts else None
    for scheme, names in plan.groups.items():
        for name in names:
            module = modules[name]
            if isinstance(module, QuantLinear):
                packed.update(matrix_tensors(name, module, scheme, module.input_quantizer))
                linears[name] = [name]
                continue
            matrices = expert_matrices(model, empty, name, module)
            for m in matrices:
                packed.update(matrix_tensors(m.prefix, m.weight, scheme, rows=m.rows))
            linears[name] = [m.prefix for m in matrices]
    floats: dict[str, torch.Tensor] = {}
    for name in plan.dense:
        floats[f"{name}.weight"] = modules[name].dequantize_rows().cpu().contiguous()
        if getattr(modules[name], "bias", None) is not None:
            floats[f"{name}.bias"] = modules[name].bias.detach().cpu().contiguous()
    prefixes = tuple(f"{name}." for name in modules)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            floats[key] = value.detach().cpu().contiguous()
    return {**floats, **packed}, linears


def _config_groups(plan: _Plan, modules: dict, linears: dict, tensors: dict) -> list[tuple[Scheme, list[str]]]:
    """Config groups: the Linears of a scheme by name; fused experts' Linears in a group of their own, by
    `re:` patterns (ct_experts.expert_targets), from which transformers reads the experts' scheme."""
    written = {key.rpartition(".")[0] for key in tensors}
    fused_fp = any(t.dim() == 3 and t.is_floating_point() for t in tensors.values())  # experts kept in FP
    groups = []
    for scheme, names in plan.groups.items():
        dense = [n for n in names if isinstance(modules[n], QuantLinear)]
        experts = [t for n in names if isinstance(modules[n], QuantExperts) for t in linears[n]]
        if dense:
            groups.append((scheme, dense))
        if experts:
            groups.append((scheme, expert_targets(experts, written, fused_fp)))
    return groups


def export_compressed_tensors(model: nn.Module, out_dir: str | Path, allow_unservable: bool = False) -> Path:
    """Writes `config.json` and `model.safetensors` of `model` (a frozen hf_qlimit model) to `out_dir`."""
    if sys.byteorder != "little":
        raise ExportError("compressed-tensors' int32 packing is written little-endian; export on a little-endian host.")
    _refuse_unexpressible(model)
    refuse_input_transforms(model, "compressed-tensors")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    if not modules:
        raise ExportError("The model has no hf_qlimit quantized modules: quantize it (or load a qlimit folder) first.")
    weights = [
        w for m in modules.values() for w in (m.expert_weights().values() if isinstance(m, QuantExperts) else [m])
    ]
    if any(not w.is_frozen for w in weights):
        raise ExportError("The model's quantization has not finished (some modules are not frozen).")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plan = _plan(model, modules, allow_unservable)
    _check_loading(model, modules, plan, config)
    _one_scheme(model, modules, plan)
    if not plan.groups:
        raise ExportError("The model has no quantized Linears to write in compressed-tensors' formats.")
    tensors, linears = _tensors(model, modules, plan, config)
    groups = _config_groups(plan, modules, linears, tensors)
    config["quantization_config"] = _quantization_config(groups, plan.dequantize)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_dedupe(tensors), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
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


def _quantization_config(groups: list[tuple[Scheme, list[str]]], dequantize: bool) -> dict[str, Any]:
    config_groups = {f"group_{i}": scheme.to_dict(targets) for i, (scheme, targets) in enumerate(groups)}
    config = {
        "quant_method": "compressed-tensors",
        "format": groups[0][0].format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
    }
    if dequantize:
        # transformers then loads every weight dense (exact); vLLM, by its docs, ignores the key (not tried here)
        config["dequantize"] = True
    return config
