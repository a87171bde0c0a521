"""OPT decoders."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class OPTAdapter(ArchitectureAdapter):
    model_types = ("opt",)
    attention_path = "self_attn"
    norm_inputs = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("fc1",))
    norms = ("self_attn_layer_norm", "final_layer_norm")
    attention_output = "self_attn.out_proj"
    ffn_down = "fc2"

    def folding_norms(self, model):
        # OPT-350m is post-LN: its norms' outputs also feed the residual
        return self.norms if getattr(model.config, "do_layer_norm_before", True) else ()
