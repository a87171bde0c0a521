"""Falcon decoders, whose norms depend on the config:
- Falcon-7B style (parallel attention, one norm): `input_layernorm` feeds the fused `query_key_value` and
  `dense_h_to_4h` alike, so both groups take one set of channel factors, folded once;
- the new decoder architecture with two norms (40B, 180B): `ln_attn` and `ln_mlp`, one per group;
- sequential attention (RW-1B): `input_layernorm`, then `post_attention_layernorm` on the residual sum."""

from torch import nn

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class FalconAdapter(ArchitectureAdapter):
    model_types = ("falcon",)
    attention_path = "self_attention"
    norm_inputs = (("self_attention.query_key_value",), ("mlp.dense_h_to_4h",))
    norms = ("input_layernorm", "input_layernorm")
    attention_output = "self_attention.dense"
    ffn_down = "mlp.dense_4h_to_h"

    def folding_norms(self, model: nn.Module) -> tuple[str, ...]:
        config = model.config
        if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
            return ("ln_attn", "ln_mlp")
        if not config.new_decoder_architecture and not config.parallel_attn:
            return ("input_layernorm", "post_attention_layernorm")
        return self.norms
