"""Export a weight-only model to one GGUF file that llama.cpp runs as it is: tensors, hyper-parameters, tokenizer.

Tensors take llama.cpp's names through `gguf.TensorNameMap` for the families in `gguf_metadata.FAMILIES`
(Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3, Phi-3). Quantized Linears (and embeddings) are written
in the GGUF block type that holds hf_qlimit's codes exactly (`gguf_blocks.encode_quantized`), the rest as
float32 with their exact values. What the converter changes, this changes too: Llama / Mistral Q and K rows
permuted to llama.cpp's rotary pairing (each row is encoded alone in every block type, so the permutation moves
encoded rows), Gemma norm weights +1, Phi-3's fused qkv / gate_up kept fused. A tied LM head (the same values
as the embedding) is written once, as token_embd.weight, which llama.cpp reads when output.weight is absent.
Hyper-parameters: `gguf_metadata.py`; tokenizer keys: `gguf_tokenizer.py`.

Refused (ExportError): activation or attention quantization, explicit input transforms, families without a
llama.cpp mapping, a model without tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..nn.attention import ATTENTION_ATTR
from ..nn.embedding import QuantEmbedding
from ..nn.modules import QuantLinear
from .common import ExportError, refuse_input_transforms
from .gguf_blocks import encode_quantized, module_gguf_choice
from .gguf_metadata import Family, add_general, add_hyperparameters, arch_name, family_of, rope_tensors
from .gguf_tokenizer import add_tokenizer

logger = logging.get_logger(__name__)

SKIPPED = (".rotary_emb.",)  # recomputed by llama.cpp (transformers keeps them out of state dicts anyway)


def export_gguf(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Writes `model` (weight-only hf_qlimit, or FP) to `out_dir/model.gguf` and returns the file's path.

    `tokenizer`: a transformers tokenizer or the folder it was saved to (a `tokenizer.gguf` there, written by
    `hf_qlimit.cli.gguf_to_hf`, gives the source GGUF's tokenizer keys as they were).
    """
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the `gguf` package: pip install gguf (or hf_qlimit[examples]).") from None

    family = family_of(model.config)
    quantized = _check_exportable(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch_name(family))
    add_hyperparameters(writer, model.config, family)
    add_tokenizer(writer, tokenizer, _rows(model.get_input_embeddings()))
    written = _add_tensors(writer, model, quantized, family)
    for name, data in rope_tensors(writer, model.config).items():
        writer.add_tensor(name, data)
    add_general(writer, model.config, _file_type(written), quantized=bool(set(written) - {"F32"}))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _check_exportable(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized modules of `model`, or ExportError where GGUF cannot hold it."""
    refuse_input_transforms(model, "GGUF")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    acts = [n for n, m in quantized.items() if getattr(m, "input_quantizer", None) is not None]
    acts += [n for n, m in model.named_modules() if getattr(m, ATTENTION_ATTR, None) is not None]
    if acts:
        raise ExportError(
            f"GGUF stores quantized weights only; {len(acts)} modules quantize activations (first: "
            f"{acts[0]!r}). Export a weight-only model (act_bits=None)."
        )
    return quantized


def _file_type(written: Counter) -> int:
    """general.file_type: the block type that holds most weights (all float32: ALL_F32)."""
    import gguf

    blocks = [kind for kind, _ in written.most_common() if kind != "F32"]
    member = f"MOSTLY_{blocks[0]}" if blocks else "ALL_F32"
    return int(getattr(gguf.LlamaFileType, member, gguf.LlamaFileType.GUESSED))


def _weights(module: nn.Module) -> torch.Tensor:
    """The values a (quantized or float) embedding / Linear computes with, float32 on CPU."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.dequantize_rows().float().cpu()
    return module.weight.detach().float().cpu()


def _tied_head(model: nn.Module, family: Family) -> bool:
    """Whether the LM head computes with exactly the embedding's values (then only token_embd.weight is written).
    For families whose llama.cpp graph always reads the head from the embedding, a different head is an error."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return False
    tied_by_config = bool(getattr(model.config, "tie_word_embeddings", False))
    shared = getattr(emb, "reads_head_codes", False) or getattr(head, "weight", None) is getattr(emb, "weight", 0)
    if not (tied_by_config or shared or family.head_is_embedding):
        return False  # an untied head: no full comparison of two vocabulary-sized tables
    same = _rows(emb) == _rows(head) and torch.equal(_weights(emb), _weights(head))
    if not same and family.head_is_embedding:
        raise ExportError(
            f"llama.cpp's {model.config.model_type} reads the LM head from the token embedding, but this model's "
            "head holds other values (quantized on another grid, or untied). Quantize the head and embedding "
            "alike (tied) or keep both in full precision."
        )
    if not same and (tied_by_config or shared):
        logger.warning("The LM head is tied to the embedding but rounds to other values; both are written.")
    return same


def _rows(module: nn.Module) -> int:
    return module.rows if isinstance(module, (QuantLinear, QuantEmbedding)) else module.weight.shape[0]


def _add_tensors(writer: Any, model: nn.Module, quantized: dict[str, nn.Module], family: Family) -> Counter:
    """Every weight under llama.cpp's name; returns GGUF type -> number of weights written in it."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), config.num_hidden_layers)
    modules = {m: n for n, m in model.named_modules()}
    emb_name, head = modules[model.get_input_embeddings()], model.get_output_embeddings()
    head_name = modules.get(head) if head is not None else None
    tied = _tied_head(model, family)
    skip = {head_name} if tied else set()
    written: Counter = Counter()
    fp_matrices: list[str] = []
    prefixes = tuple(f"{n}." for n in quantized)
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if name.startswith(prefixes) or owner in skip or any(s in f".{name}" for s in SKIPPED):
            continue
        target = _target(names, name)
        data = tensor.detach().float().cpu()
        if name.endswith("norm.weight"):
            data = data + family.norm_shift
        order = _rope_order(target, data.shape[0], config, family)
        writer.add_tensor(target, (data if order is None else data[order]).numpy())
        written["F32"] += data.numel()
        fp_matrices += [owner] if data.ndim == 2 else []
    floats: dict[str, list[str]] = {}  # why no GGUF type -> the quantized modules written as float32
    for name, module in quantized.items():
        if name in skip:
            continue
        sources = [module, head] if tied and name == emb_name and head_name in quantized else [module]
        kind = _add_quantized(writer, name, sources, names, config, family)
        written[kind] += module.rows * module.cols
        if kind == "F32":
            floats.setdefault(module_gguf_choice(module).reason, []).append(name)
    _log_float32(floats, fp_matrices)
    return written


def _log_float32(floats: dict[str, list[str]], fp_matrices: list[str]) -> None:
    """Says which matrices went into the file as float32: quantized ones whose grid has no GGUF type (a warning,
    with the reason and the fix), and those the model holds unquantized."""
    for reason, modules in floats.items():
        logger.warning(
            f"{modules}: {reason}, so no GGUF block type holds their codes; written as float32 with their exact "
            "values (a larger file). weight_format='gguf:q4_0' (--format) quantizes on GGUF's own grids."
        )
    if fp_matrices:
        logger.info(f"Not quantized, written as float32 (their exact values): {fp_matrices}")


def _add_quantized(writer: Any, name: str, sources: list[nn.Module], names: Any, config: Any, family: Family) -> str:
    """Writes a quantized module (its weight, and bias) in the first of `sources` (modules holding the same
    values) that maps onto a GGUF block type, else float32; returns the GGUF type written."""
    import gguf

    module = sources[0]
    target = _target(names, f"{name}.weight")
    order = _rope_order(target, module.rows, config, family)
    mapped = next((m for m in map(encode_quantized, sources) if m is not None), None)
    if mapped is None:
        weight = module.dequantize_rows().float().cpu()
        writer.add_tensor(target, (weight if order is None else weight[order]).numpy())
        kind = "F32"
    else:
        kind, data = mapped
        data = data if order is None else data[order.numpy()]
        writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().float().cpu()
        writer.add_tensor(_target(names, f"{name}.bias"), (bias if order is None else bias[order]).numpy())
    return kind


def _target(names: Any, name: str) -> str:
    target = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if target is None:
        raise ExportError(
            f"No llama.cpp tensor name for {name!r} (gguf.TensorNameMap knows none); this model holds a tensor "
            "its llama.cpp architecture does not read. Export another format (compressed-tensors)."
        )
    return target


def _rope_order(target: str, n_rows: int, config: Any, family: Family) -> torch.Tensor | None:
    """Row order of Q / K (weight or bias) for llama.cpp's rotary pairing: neighbouring rows, where transformers'
    rotate_half pairs the two halves of each head. None for other tensors and other families."""
    if not family.permute_qk:
        return None
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    kind = target.split(".")[-2] if target.startswith("blk.") else ""
    if kind not in heads:
        return None
    dim = n_rows // heads[kind] // 2
    return torch.arange(n_rows).reshape(heads[kind], 2, dim).swapaxes(1, 2).reshape(-1)
