"""Where a model's blocks are (found from the model: discovery.py) and the adapters that add what cannot be
derived (the outlier transforms' norm/group structure): one short file per family."""

from . import bert, falcon, gemma, gpt2, gpt_neox, llama, moe, olmo2, opt, phi  # noqa: F401  (registers the adapters)
from .base import ArchitectureAdapter, is_causal_lm
from .discovery import BlockStack, find_stacks, verify_stacks
from .registry import GenericAdapter, get_adapter, register_adapter, supported_model_types

__all__ = [
    "ArchitectureAdapter",
    "BlockStack",
    "GenericAdapter",
    "find_stacks",
    "get_adapter",
    "is_causal_lm",
    "register_adapter",
    "supported_model_types",
    "verify_stacks",
]
