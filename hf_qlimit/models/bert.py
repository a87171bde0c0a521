"""BERT and encoders of the same layout (RoBERTa, XLM-R)."""

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class BertAdapter(ArchitectureAdapter):
    model_types = ("bert", "roberta", "xlm-roberta")
    blocks_path = "encoder.layer"
    attention_path = "attention.self"
