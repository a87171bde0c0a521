"""GPT-NeoX (Pythia) decoders: fused `query_key_value`, two LayerNorms. With the parallel residual (the default)
both read the block input, `input_layernorm` for attention and `post_attention_layernorm` for the MLP; without
it the second reads the attention's residual sum. Either way each norm feeds one Linear only."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class GPTNeoXAdapter(ArchitectureAdapter):
    model_types = ("gpt_neox",)
    attention_path = "attention"
    norm_inputs = (("attention.query_key_value",), ("mlp.dense_h_to_4h",))
    norms = ("input_layernorm", "post_attention_layernorm")
    attention_output = "attention.dense"
    ffn_down = "mlp.dense_4h_to_h"
