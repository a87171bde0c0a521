"""Mixture-of-experts decoders with transformers' fused experts: Mixtral, Qwen3-MoE.

`post_attention_layernorm` feeds the router (`mlp.gate`, kept in full precision) and the fused experts alike.
Channel factors folded into that norm are undone in the router's weight, so routing is unchanged, and move into
every expert's input projection. The experts' second projection reads a tensor computed inside their forward (not
quantized), so there is no `ffn_down`; the rotations are refused (transforms/support.py says why)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class MoEAdapter(ArchitectureAdapter):
    model_types = ("mixtral", "qwen3_moe")
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate", "mlp.experts"))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "self_attn.o_proj"
