"""What a GGUF file says about its model: llama.cpp's architecture for a transformers family, and the
hyper-parameter keys (and rotary tables) that architecture reads.

The keys follow what llama.cpp's `convert_hf_to_gguf.py` writes per architecture: sizes, head counts and head
size, rotary base / dimensions / scaling, RMS epsilon, Gemma-2/3's sliding window, its layer pattern and
softcaps, Phi-3's original context. The family table also holds what changes the tensors: Llama and Mistral
pair rotary dimensions differently from transformers (their Q/K rows are permuted), Gemma stores its norm
weights as w with the norm computing (1 + w) where llama.cpp multiplies by w, Gemma and Gemma-2 read their LM
head from the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.utils import logging

from .common import ExportError

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Family:
    """How one transformers `model_type` becomes a llama.cpp architecture."""

    arch: str  # member of gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's rotary pairs neighbouring rows, transformers' rotate_half the halves
    norm_shift: float = 0.0  # added to every norm weight (Gemma's RMSNorm computes x·(1 + w))
    head_is_embedding: bool = False  # llama.cpp reads the head from token_embd and accepts no output.weight


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as a Llama
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma": Family("GEMMA", norm_shift=1.0, head_is_embedding=True),
    "gemma2": Family("GEMMA2", norm_shift=1.0, head_is_embedding=True),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0),
    "phi3": Family("PHI3"),
}


def family_of(config: Any) -> Family:
    """The family entry of `config.model_type`, or ExportError naming the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ExportError(
            f"GGUF export does not map model type {config.model_type!r} onto a llama.cpp architecture; supported: "
            f"{sorted(FAMILIES)}. Export another format (compressed-tensors), or convert the FP model with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    return family


def arch_name(family: Family) -> str:
    """llama.cpp's name of the architecture ("llama", "gemma3", ...): general.architecture and the key prefix."""
    import gguf

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_params(config: Any) -> tuple[dict, dict | None]:
    """(full-attention rotary parameters, sliding-window layers' own or None): gemma3_text keeps one per layer type."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention", {}), params.get("sliding_attention")
    return params, None


def add_hyperparameters(writer: Any, config: Any, family: Family) -> None:
    """The keys llama.cpp reads to build `family`'s graph from `config` (a transformers config)."""
    dim = head_dim(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    full, sliding = rope_params(config)
    partial = full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    writer.add_rope_dimension_count(int(partial * dim))
    writer.add_rope_freq_base(float(full.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if sliding is not None and "rope_theta" in sliding:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    _add_rope_scaling(writer, config, full)
    if family.arch in ("GEMMA2", "GEMMA3"):
        _add_gemma_attention(writer, config, family)
    elif family.arch == "PHI3":
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: no window (as Phi-4)
    else:
        _note_sliding_window(config)


def _add_rope_scaling(writer: Any, config: Any, full: dict) -> None:
    """Rotary scaling keys; llama3's and longrope's per-dimension factors are tensors (`rope_tensors`)."""
    import gguf

    kind = (full.get("rope_type") or "default").lower()
    original = full.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if full.get(key) is not None:
                add(float(full[key]))
    elif kind == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):
        raise ExportError(
            f"Rotary scaling {kind!r} has no GGUF form here (linear, yarn, llama3 and longrope do); export another "
            "format or convert the FP model with llama.cpp's convert_hf_to_gguf.py."
        )
    if original is not None and kind != "yarn" and config.model_type == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(original))  # Phi-3's converter states it even unscaled


def rope_tensors(writer: Any, config: Any) -> dict[str, np.ndarray]:
    """Extra float32 tensors llama.cpp takes for llama3 (rope_freqs: a divisor per rotary frequency) and longrope
    (rope_factors_long/short) scaling, computed from transformers' own rotary initialisation."""
    import gguf
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    full, _ = rope_params(config)
    kind = (full.get("rope_type") or "default").lower()
    name = gguf.TENSOR_NAMES
    if kind == "llama3":
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
        dim = head_dim(config)
        base = 1.0 / (float(full["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return {f"{name[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight": (base / scaled.double()).float().numpy()}
    if kind == "longrope":
        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config)
        writer.add_rope_scaling_attn_factors(float(attention_factor))
        return {
            f"{name[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG]}.weight": np.asarray(full["long_factor"], np.float32),
            f"{name[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]}.weight": np.asarray(full["short_factor"], np.float32),
        }
    return {}


def _add_gemma_attention(writer: Any, config: Any, family: Family) -> None:
    """Gemma-2/3: sliding window and which layers use it, logit softcaps; the attention scale llama.cpp assumes."""
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
        types = getattr(config, "layer_types", None)
        if types:  # per layer, exact (llama.cpp's default pattern is every 2nd / 6th layer global)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    if family.arch == "GEMMA2" and getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config):
        # llama.cpp scales queries by 1/sqrt(head_dim) (by hidden/heads for its 27B sizes only)
        logger.warning(
            f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim(config)}; llama.cpp scales the "
            "queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer counts), so its outputs may differ."
        )


def _note_sliding_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", True)  # Qwen2 carries a window it does not use by default
    if window and used and window < config.max_position_embeddings:
        logger.warning(
            f"{config.model_type} attends within a sliding window of {window} tokens; llama.cpp's "
            f"{config.model_type} graph attends to the whole context, so outputs differ past {window} tokens."
        )


def add_general(writer: Any, config: Any, file_type: int | None, quantized: bool) -> None:
    """general.name, general.file_type (the type most weights take) and, with quantized tensors, the version of
    ggml's block layouts they follow."""
    import gguf

    name = str(getattr(config, "name_or_path", "") or "").rstrip("/").rpartition("/")[2]
    # not the model type: llama.cpp reads Phi-3's special tokens into any vocabulary named "phi3"
    writer.add_name(name or "model")
    if file_type is not None:
        writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
