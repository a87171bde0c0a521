"""Fused MoE experts in a compressed-tensors folder: one Linear per expert and projection.

compressed-tensors quantizes Linears, and MoE checkpoints in this format hold one Linear per expert:
`mlp.experts.{e}.gate_proj.weight_packed`. transformers 5 builds its experts fused ([E, out, in] parameters); its
conversion mapping merges the per-expert keys back on loading, and its compressed-tensors loader
(`CompressedTensorsDequantize`) dequantizes each expert first. So the export writes each expert's rows under the
names transformers' own `save_pretrained` gives them: the mapping reverted on a tensor of row indices says which
rows of hf_qlimit's [E·out, in] matrix each per-expert key holds, whatever the family splits or renames.

That loader reads each expert's `weight_packed`, `weight_scale` and `weight_shape` only, with the experts'
config group: asymmetric experts (zero points) and activation quantization (W8A8) cannot be loaded, so both
are refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.experts import QuantExpertWeight
from .common import ExportError


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert's projection: the checkpoint's Linear `prefix`, rows `rows` of the fused `weight`."""

    prefix: str
    weight: QuantExpertWeight
    rows: torch.Tensor


def refuse_unloadable(model: nn.Module, name: str, experts: nn.Module, symmetric: bool) -> None:
    """What transformers' compressed-tensors loader cannot give back for the QuantExperts `experts`."""
    where = f"{model.config.model_type}: {name!r} (fused MoE experts)"
    if experts.input_quantizer is not None:
        raise ExportError(
            f"{where} quantize their input (W8A8). transformers loads compressed-tensors experts by dequantizing "
            "each expert's weights and fusing them, with no activation quantization, so the reloaded model would "
            "differ. Export a weight-only model (act_bits=None, weight_sym=True), or keep the experts out with "
            "`modules_to_not_convert`."
        )
    if not symmetric:
        raise ExportError(
            f"{where} have asymmetric weights. transformers' compressed-tensors loader dequantizes each expert from "
            "its weight_packed, weight_scale and weight_shape only (no zero point), so they cannot be reloaded. "
            "Quantize with `weight_sym=True`, or keep the experts out with `modules_to_not_convert`."
        )
    extra = [n for n, _ in experts.wrapped.named_parameters()]
    if extra:
        raise ExportError(
            f"{where} have parameters besides their quantized weights ({extra}, e.g. biases), which the export "
            "cannot place on per-expert Linears. Keep the experts out with `modules_to_not_convert`."
        )


def expert_matrices(model: nn.Module, empty: nn.Module, name: str, experts: nn.Module) -> list[ExpertMatrix]:
    """The per-expert Linears of the QuantExperts `experts` (at `name`), in the checkpoint's naming: that of
    `empty`, a fresh copy of the model's class (a model loaded by `from_pretrained` keeps the conversions that
    loading used, none for an hf_qlimit checkpoint; a fresh one gets those transformers' loader will use)."""
    from transformers.core_model_loading import revert_weight_conversion

    weights = experts.expert_weights()
    offsets, start = {}, 0
    for param, weight in weights.items():  # each fused weight's rows get their own range of indices
        offsets[param], start = start, start + weight.rows
    indices = {f"{name}.{param}": _row_indices(w, offsets[param]) for param, w in weights.items()}
    reverted = revert_weight_conversion(empty, dict(indices))
    where = f"{model.config.model_type}: {name!r} (fused MoE experts)"
    if set(reverted) & set(indices):
        raise ExportError(
            f"{where}: transformers saves them as fused 3-D tensors (its conversion mapping has no per-expert "
            "layout for this family), which compressed-tensors cannot quantize. Keep the experts out with "
            "`modules_to_not_convert`."
        )
    matrices, covered = [], {param: [] for param in weights}
    for key, index in reverted.items():
        if not key.endswith(".weight") or index.dim() != 2 or index.shape[1] != 1:
            raise ExportError(
                f"{where}: transformers saves {key!r} with shape {tuple(index.shape)} (rows x 1 expected), not as "
                "an [out, in] Linear weight that compressed-tensors can quantize. Keep the experts out with "
                "`modules_to_not_convert`."
            )
        param = max((p for p in weights if offsets[p] <= int(index.min())), key=offsets.__getitem__)
        rows = index[:, 0] - offsets[param]
        matrices.append(ExpertMatrix(key.removesuffix(".weight"), weights[param], rows))
        covered[param].append(rows)
    for param, parts in covered.items():  # every row of every expert exactly once
        expected = torch.arange(weights[param].rows)
        if not parts or not torch.equal(torch.cat(parts).sort().values, expected):
            raise ExportError(f"{where}: the per-expert keys transformers saves do not hold each row of {param} once.")
    return matrices


def _row_indices(weight: QuantExpertWeight, offset: int) -> torch.Tensor:
    """A tensor shaped like the fused parameter with its input dimension cut to 1, holding `offset` + each row's
    index in the [E·out, in] matrix."""
    rows = torch.arange(offset, offset + weight.rows, dtype=torch.int64)
    rows = rows.reshape(weight.experts, weight.out_features, 1)
    return rows.transpose(1, 2) if weight.transposed else rows


def expert_targets(prefixes: list[str], modules: set[str], fused_fp: bool) -> list[str]:
    """Config-group targets for the per-expert Linears `prefixes`, as few `re:` patterns as select exactly them
    among the folder's `modules`: every index generalised (all layers' experts) unless some experts stay fused
    in full precision (`fused_fp`, which such a pattern would also name in a reader with per-expert modules),
    else the expert index only (one pattern per layer and projection). transformers finds the experts' group by
    a pattern naming "experts"; exact names would each draw a "could not match" warning where it keeps the
    experts fused."""
    wanted = set(prefixes)
    for last_only in (False, True) if not fused_fp else (True,):
        patterns = sorted({_pattern(p, last_only) for p in prefixes})
        compiled = [re.compile(p) for p in patterns]
        if {m for m in modules if any(c.match(m) for c in compiled)} == wanted:
            return [f"re:{p}" for p in patterns]
    return sorted(wanted)


def _pattern(prefix: str, last_only: bool) -> str:
    parts = prefix.split(".")
    numbers = [i for i, part in enumerate(parts) if part.isdigit()]
    general = set(numbers[-1:] if last_only else numbers)
    # anchored at the end: compressed-tensors matches `re:` targets with re.match
    return r"\.".join(r"\d+" if i in general else re.escape(part) for i, part in enumerate(parts)) + "$"
