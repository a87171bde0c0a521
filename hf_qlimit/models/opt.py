"""OPT decoders."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class OPTAdapter(ArchitectureAdapter):
    model_types = ("opt",)
    blocks_path = "decoder.layers"
    attention_path = "self_attn"
