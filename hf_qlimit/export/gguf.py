"""Export a weight-only Llama-family model to one GGUF file (llama.cpp's format), read back with the `gguf` package.

GGUF's Q4_1 block is 32 weights with value = d·q + m, q in [0, 15]; hf_qlimit's w = (q − z)·s is that with d = s
and m = −s·z, the same codes q. Q8_0 is value = d·c with c in [−128, 127]: a symmetric 8-bit grid (z = 128),
c = q − 128. Groups of 64, 128, ... (or one per row) repeat their (d, m) over each block of 32. d and m are
stored as float16, so the values match hf_qlimit's up to float16 rounding of the scales (relative ~5e-4);
the codes are the same.

Limits: weight-only Llama models (the names and the Q/K row order llama.cpp uses); embeddings and Linears whose
grid does not map (an asymmetric 8-bit head, other bit widths) are written as float32 (their exact values); no
tokenizer metadata is written, so llama.cpp needs the tokenizer fields of the source GGUF to run the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..nn.attention import ATTENTION_ATTR
from ..nn.embedding import QuantEmbedding
from ..nn.modules import QuantLinear
from .common import ExportError, refuse_input_transforms
from .gguf_blocks import encode_quantized

logger = logging.get_logger(__name__)

_NAMES = [  # hf_qlimit (transformers) name -> GGUF name, llama.cpp's convention
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
]


def gguf_name(name: str) -> str:
    for pattern, target in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise ExportError(f"No GGUF name for {name!r}: only Llama-family tensors are mapped.")


def _rope_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp wants for Q and K (its rotary embedding pairs neighbouring rows, HF's halves)."""
    dim = n_rows // heads // 2
    return torch.arange(n_rows).reshape(heads, 2, dim).swapaxes(1, 2).reshape(-1)


def export_gguf(model: nn.Module, out_dir: str | Path) -> Path:
    """Writes `model` (a weight-only hf_qlimit Llama) to `out_dir/model.gguf` and returns the file's path."""
    import gguf

    quantized = _check_exportable(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hyperparameters(writer, model.config)
    _add_tensors(writer, model, quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _check_exportable(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized modules of `model`, or ExportError where GGUF cannot hold it."""
    if model.config.model_type != "llama":
        raise ExportError(
            f"GGUF export maps Llama models only (llama.cpp's names and Q/K order); got {model.config.model_type!r}."
        )
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


def _add_hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tensors(writer, model: nn.Module, quantized: dict[str, nn.Module]) -> None:
    """The float tensors as they are, the quantized ones as Q4_1 / Q8_0 blocks where their grid maps exactly."""
    import gguf

    config = model.config
    floats = []
    prefixes = tuple(f"{n}." for n in quantized)
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefixes):
            writer.add_tensor(gguf_name(name), tensor.detach().float().cpu().numpy())
    for name, module in quantized.items():
        target = gguf_name(f"{name}.weight")
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        order = next((_rope_rows(module.rows, h) for key, h in heads.items() if f".{key}." in target), None)
        mapped = encode_quantized(module)
        if mapped is None:  # exact float values instead
            weight = module.dequantize_rows().cpu()
            floats.append(name)
            writer.add_tensor(target, (weight if order is None else weight[order]).numpy())
            continue
        kind, data = mapped
        data = data if order is None else data[order.numpy()]
        writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    if floats:
        logger.warning(
            f"{floats} map onto neither Q4_1 nor Q8_0 (only 4-bit, or symmetric 8-bit, groups of 32k "
            "do); written as float32 with their exact values."
        )
