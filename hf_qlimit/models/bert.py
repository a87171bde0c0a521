"""BERT and encoders of the same layout (RoBERTa, XLM-R)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class BertAdapter(ArchitectureAdapter):
    model_types = ("bert", "roberta", "xlm-roberta")
    attention_path = "attention.self"
    norm_inputs = (("attention.self.query", "attention.self.key", "attention.self.value"), ("intermediate.dense",))
    attention_output = "attention.output.dense"
    ffn_down = "output.dense"  # post-LN: no norm feeds only Linears, so channel factors stay explicit ops
    output_feeds_linears = True
