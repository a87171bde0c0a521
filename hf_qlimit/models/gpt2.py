"""GPT-2 decoders: transformers' Conv1D layers (weight stored [in, out]), fused `c_attn`, pre-LN LayerNorms."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    attention_path = "attn"
    norm_inputs = (("attn.c_attn",), ("mlp.c_fc",))
    norms = ("ln_1", "ln_2")
    attention_output = "attn.c_proj"
    ffn_down = "mlp.c_proj"
