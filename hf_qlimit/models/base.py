"""What an architecture adapter says: where the blocks are and which modules get which bits."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..config import QLimitConfig


def matches(name: str, pattern: str) -> bool:
    """A module name matches its full name, an fnmatch pattern, or a dotted suffix such as "lm_head"."""
    return name == pattern or fnmatch(name, pattern) or name.endswith("." + pattern)


class ArchitectureAdapter:
    """One family of architectures. Subclasses only set the class attributes.

    A block is one transformer layer (attention + FFN); the Linears inside blocks get `weight_bits` and
    `act_bits`. Plain `nn.Embedding`s and Linears outside the blocks are the first and last layers
    (embeddings, task or LM head) and get `first_last_bits`.
    """

    model_types: tuple[str, ...] = ()
    blocks_path: str = ""  # the blocks' ModuleList, relative to `model.base_model`
    attention_path: str = ""  # the module inside a block that calls transformers' attention interface

    def blocks_name(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        return next(name for name, module in model.named_modules() if module is blocks)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.blocks_path)

    def layer_config(self, model: nn.Module, config: "QLimitConfig") -> dict[str, dict[str, Any]]:
        """Module name -> {"kind", "w" (weight bits), "a" (input activation bits)} of every module to convert."""
        prefix = self.blocks_name(model) + "."
        first_last_act = config.first_last_bits if config.act_bits is not None else None
        plan: dict[str, dict[str, Any]] = {}
        for name, module in model.named_modules():
            in_block = name.startswith(prefix)
            if any(matches(name, pattern) for pattern in config.modules_to_not_convert or ()):
                continue
            if type(module) is nn.Linear:  # exact type: subclasses may carry their own forward
                spec = {"kind": "linear", "w": config.weight_bits, "a": config.act_bits}
                if not in_block:
                    spec = {"kind": "linear", "w": config.first_last_bits, "a": first_last_act}
            elif type(module) is nn.Embedding and not in_block:
                spec = {"kind": "embedding", "w": config.first_last_bits}
            elif in_block and name.endswith("." + self.attention_path) and config.quantize_attention:
                if config.act_bits is None:
                    continue
                spec = {"kind": "attention", "a": config.act_bits}
            else:
                continue
            for pattern, bits in config.module_bits.items():
                if spec["kind"] != "attention" and matches(name, pattern):
                    spec["w"] = bits
            if spec.get("w", 0) is None:
                continue  # first/last layers kept in full precision
            plan[name] = spec
        return plan
