"""Llama-family decoders: Llama, Qwen2, Mistral (RMSNorm, rotary embeddings, gated MLP, grouped-query attention)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "qwen2", "mistral")
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "self_attn.o_proj"
    ffn_down = "mlp.down_proj"
