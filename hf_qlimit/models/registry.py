"""Adapters by `config.model_type`; any other model gets the generic one."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


class GenericAdapter(ArchitectureAdapter):
    """A model without an adapter: its blocks, layers and attention modules are found from the model itself.
    What needs an adapter's structure (the outlier transforms, `act_layout="block_output"`) is refused."""


_GENERIC = GenericAdapter()


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls()
    return cls


def supported_model_types() -> list[str]:
    """The model types with an adapter (they also get the outlier transforms and `act_layout` choices)."""
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _ADAPTERS.get(model_type, _GENERIC)
