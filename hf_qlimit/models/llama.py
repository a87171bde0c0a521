"""Llama-family decoders: Llama, Qwen2, Mistral (RMSNorm, rotary embeddings, gated MLP, grouped-query attention)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "qwen2", "mistral")
    blocks_path = "layers"
    attention_path = "self_attn"
