"""OLMo 2 decoders: RMSNorm after each sub-layer (on its output, before the residual sum), so no norm precedes
Q/K/V or gate/up: they read the residual stream itself. Channel factors cannot fold and stay explicit ops; the
full-width q_norm/k_norm act on the projections' outputs. A block's output is the next block's Q/K/V input (and
its residual), as in post-LN BERT, so `act_layout="block_output"` quantizes it once there."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class Olmo2Adapter(ArchitectureAdapter):
    model_types = ("olmo2",)
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    attention_output = "self_attn.o_proj"
    ffn_down = "mlp.down_proj"
    output_feeds_linears = True
