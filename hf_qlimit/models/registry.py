"""Adapters by `config.model_type`."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls()
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"hf_qlimit does not support the architecture {model_type!r} yet. Supported model types: "
            f"{supported_model_types()}. Adding one is a short adapter in hf_qlimit/models/."
        )
    return _ADAPTERS[model_type]
