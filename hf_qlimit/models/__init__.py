"""Architecture adapters: one short file per family."""

from . import bert, llama, opt  # noqa: F401  (registers the adapters)
from .base import ArchitectureAdapter
from .registry import get_adapter, register_adapter, supported_model_types

__all__ = ["ArchitectureAdapter", "get_adapter", "register_adapter", "supported_model_types"]
