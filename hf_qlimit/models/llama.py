"""Llama-family decoders: Llama, Qwen2, Mistral, Qwen3, Granite (RMSNorm, rotary embeddings, gated MLP,
grouped-query attention). Qwen3's q_norm/k_norm act on the projections' outputs, Granite's multipliers on the
residual stream and logits: neither touches a Linear's input, so the transforms apply as on Llama."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "qwen2", "mistral", "qwen3", "granite")
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "self_attn.o_proj"
    ffn_down = "mlp.down_proj"
