"""Phi (1, 1.5, 2) and Phi-3 decoders.

Phi: one LayerNorm feeds attention and MLP in parallel, so Q/K/V and fc1 read one tensor: one group, one set of
channel factors folded once. Phi-3: RMSNorm, pre-LN, fused `qkv_proj` and `gate_up_proj` (one Linear each)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class PhiAdapter(ArchitectureAdapter):
    model_types = ("phi",)
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),)
    norms = ("input_layernorm",)
    attention_output = "self_attn.dense"
    ffn_down = "mlp.fc2"


@register_adapter
class Phi3Adapter(ArchitectureAdapter):
    model_types = ("phi3",)
    attention_path = "self_attn"
    norm_inputs = (("self_attn.qkv_proj",), ("mlp.gate_up_proj",))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "self_attn.o_proj"
    ffn_down = "mlp.down_proj"
