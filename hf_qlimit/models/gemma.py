"""Gemma decoders: RMSNorm that multiplies by (1 + w) (folding factors gives w' = (1 + w) / s − 1, which
transforms/fold.py reads from the norm itself). Gemma 2 and 3 have sandwich norms: `input_layernorm` feeds Q/K/V and
`pre_feedforward_layernorm` gate/up; `post_attention_layernorm` and `post_feedforward_layernorm` act on the
sub-layers' outputs and feed no Linear. Gemma 3's q_norm/k_norm act on the projections' outputs."""

from .base import ArchitectureAdapter
from .registry import register_adapter

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@register_adapter
class GemmaAdapter(ArchitectureAdapter):
    model_types = ("gemma",)
    attention_path = "self_attn"
    norm_inputs = (_QKV, ("mlp.gate_proj", "mlp.up_proj"))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "self_attn.o_proj"
    ffn_down = "mlp.down_proj"


@register_adapter
class Gemma2Adapter(GemmaAdapter):
    model_types = ("gemma2", "gemma3_text")
    norms = ("input_layernorm", "pre_feedforward_layernorm")
