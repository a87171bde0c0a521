"""What an architecture adapter says: where the blocks are and which modules get which bits."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers.utils import logging

from ..hf.layer_kinds import LINEAR_KINDS, MATMUL_KINDS, layer_kind, matmul_shape
from ..quantizers.formats import GGUF_FOR_BITS, fitting_format, format_spec, is_gguf
from ..transforms.input_op import InputTransform
from .discovery import BlockStack, find_stacks, found_attention, is_called

if TYPE_CHECKING:
    from ..config import QLimitConfig

logger = logging.get_logger(__name__)


def input_output_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input embedding and output head, (None, None) for a class that does not say where they are."""
    try:
        return model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only LM family (Llama, OPT, GPT-2...), from transformers' own model tables: its type has a
    causal-LM class and no masked-LM one (BERT has both), and it is not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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
    attention_path: str = ""  # the module inside a block that calls transformers' attention interface
    # Where the outlier transforms apply, block-relative. Each group lists the Linears reading one tensor that
    # a norm produced (Q/K/V; the first FFN Linear(s)); `norms` names, aligned with those groups, the norms that
    # feed only that group (pre-LN), so per-channel factors fold into them; () where a residual also reads the
    # norm's output (post-LN BERT) and the factors stay an explicit op.
    norm_inputs: tuple[tuple[str, ...], ...] = ()
    norms: tuple[str, ...] = ()
    attention_output: str = ""  # the Linear after the attention matmuls
    ffn_down: str = ""  # the FFN's second Linear, whose input comes out of GELU/SiLU
    # Post-LN: a block's output is the next block's Q/K/V input (and its residual), so act_layout="block_output"
    # quantizes it once, at the block output, inside the block's loss. Pre-LN blocks output the residual stream,
    # which deployed models keep in higher precision.
    output_feeds_linears: bool = False

    def folding_norms(self, model: nn.Module) -> tuple[str, ...]:
        """`norms`, or () when this model's norms do not feed only the Linears (e.g. a post-LN variant)."""
        return self.norms

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Every quantized input tensor of a block, as the Linears that read it."""
        return (*self.norm_inputs, (self.attention_output,), (self.ffn_down,))

    def stacks(self, model: nn.Module) -> tuple[BlockStack, ...]:
        """The model's block stacks in forward order (two for an encoder-decoder), found from the model."""
        return find_stacks(model)

    def block_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """ "name." of every stack: a module whose name starts with one of them is inside a block."""
        return tuple(stack.prefix for stack in self.stacks(model))

    def single_stack(self, model: nn.Module, needs: str) -> BlockStack:
        """The one stack of a model that has one; `needs` names what refuses several (an encoder-decoder)."""
        stacks = self.stacks(model)
        if len(stacks) != 1:
            raise ValueError(
                f"{needs} supports models with one stack of blocks; {type(model).__name__} has "
                f"{len(stacks)} ({', '.join(s.name for s in stacks)})."
            )
        return stacks[0]

    def blocks_name(self, model: nn.Module) -> str:
        return self.single_stack(model, "This feature").name

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.single_stack(model, "This feature").blocks

    def layer_config(self, model: nn.Module, config: QLimitConfig) -> dict[str, dict[str, Any]]:
        """Module name -> {"kind", "w" (weight bits), "a" (input activation bits)} of every module to convert."""
        prefix = self.block_prefixes(model)
        first_last_act = config.first_last_bits if config.act_bits is not None else None
        # an embedding tied to the LM head takes the head's grid, so both round to the same codes (shared later)
        emb, head = input_output_embeddings(model)
        tied = head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)
        plan: dict[str, dict[str, Any]] = {}
        fallbacks: dict[tuple[str, str], list[str]] = {}  # (format, the fallback taken) -> module names
        for name, module in model.named_modules():
            in_block = name.startswith(prefix)
            if any(matches(name, pattern) for pattern in config.modules_to_not_convert or ()):
                continue
            if isinstance(module, InputTransform):
                if in_block:  # an explicit op a transform left: from_pretrained rebuilds it from this spec
                    plan[name] = module.spec()
                continue
            kind = layer_kind(model, name, module)  # linear, conv1d, embedding, experts or None (hf/layer_kinds.py)
            if kind == "embedding" and not in_block and not is_called(model, name):
                continue  # a table read through its weight, not called (DeBERTa's relative embeddings, T5's `shared`)
            if kind in MATMUL_KINDS:
                spec = {"kind": kind, "w": config.weight_bits, "a": config.act_bits}
                if getattr(config, "act_dynamic", False) and config.act_bits is not None:
                    spec["dynamic"] = True  # per-token grid computed at run time
                if not in_block:
                    spec = {"kind": kind, "w": config.first_last_bits, "a": first_last_act}
            elif kind == "embedding" and not in_block:
                spec = {"kind": "embedding", "w": config.first_last_bits}
                if tied and module is emb and config.group_size is not None:
                    spec["group"] = config.group_size
            elif in_block and self.is_attention(model, name) and config.quantize_attention:
                if config.act_bits is None:
                    continue
                spec = {"kind": "attention", "a": config.act_bits, **probability_spec(config)}
            else:
                continue
            for pattern, bits in config.module_bits.items():
                if spec["kind"] != "attention" and matches(name, pattern):
                    spec["w"] = bits
            if spec.get("w", 0) is None:
                continue  # first/last layers kept in full precision
            if is_gguf(config.weight_format) and spec["kind"] != "attention":
                wanted = (
                    config.weight_format if in_block and spec["w"] == config.weight_bits else GGUF_FOR_BITS[spec["w"]]
                )
                spec.update(gguf_entries(name, module, spec["kind"], wanted))
                if spec["format"] != wanted:
                    fallbacks.setdefault((wanted, spec["format"]), []).append(name)
            plan[name] = spec
        log_fallbacks(fallbacks)
        if getattr(config, "act_layout", "") == "block_output" and config.act_bits is not None:
            self._move_quantizers_to_block_outputs(model, plan, config.act_bits)
        return plan

    def is_attention(self, model: nn.Module, name: str) -> bool:
        """Whether block module `name` calls transformers' attention interface: as the verifying forward pass
        found, else as the adapter's `attention_path` says."""
        found = found_attention(model)
        if found is not None:
            return name in found
        return bool(self.attention_path) and name.endswith("." + self.attention_path)

    def _move_quantizers_to_block_outputs(self, model: nn.Module, plan: dict[str, dict[str, Any]], bits: int) -> None:
        """Block i's output gets the quantizer of block i+1's Q/K/V inputs, which then read it as it is. Not on the
        last block (the head has its own) nor where an input transform sits in between (it quantizes its output)."""
        if not self.norm_inputs:  # no adapter: whether the output feeds Linears (post-LN) or the residual is unknown
            model_type = getattr(model.config, "model_type", type(model).__name__)
            raise ValueError(
                f"{type(self).__name__}: model type {model_type!r} has no adapter saying whether a block's output "
                "feeds the next block's Linears (output_feeds_linears, with norm_inputs naming them); "
                "act_layout='block_output' needs it. Use act_layout='shared' or 'per_linear'."
            )
        if not self.output_feeds_linears:
            return
        prefix = self.blocks_name(model) + "."
        for index in range(len(self.blocks(model)) - 1):
            readers = [f"{prefix}{index + 1}.{rel}" for rel in self.norm_inputs[0]]
            if all(plan.get(n, {}).get("kind") == "linear" and plan[n].get("a") for n in readers):
                plan[f"{prefix}{index}"] = {"kind": "block_output", "a": bits}
                for n in readers:
                    plan[n] = {**plan[n], "a": None}


def row_length(module: nn.Module, kind: str) -> int | None:
    """The weights in one row of a module's weight (one output channel, one embedding); None for fused experts,
    whose projections differ."""
    if kind in LINEAR_KINDS:
        return matmul_shape(module)[1]
    return module.embedding_dim if kind == "embedding" else None


def gguf_entries(name: str, module: nn.Module, kind: str, wanted: str) -> dict[str, Any]:
    """The layer-config entries of a module meant for the GGUF format `wanted`: it, or llama.cpp's fallback type
    where its rows do not split into super-blocks; refused where they do not split into that type's blocks."""
    cols = row_length(module, kind)
    entries = format_spec(fitting_format(wanted, cols))
    group = entries["group"]
    if cols is not None and cols > group and cols % group:
        raise ValueError(
            f"{name!r} has rows of {cols} weights, which do not split into {entries['format']}'s blocks of {group}. "
            f"Keep it in full precision (modules_to_not_convert=[{name!r}]) or quantize without weight_format."
        )
    return entries


def log_fallbacks(fallbacks: dict[tuple[str, str], list[str]]) -> None:
    """One line per k-quant format some modules could not take, naming them and the type they took."""
    for (wanted, taken), names in fallbacks.items():
        logger.warning(
            f"weight_format: {wanted} needs rows that split into super-blocks of 256 weights; {', '.join(names)} "
            f"take {taken} instead (llama.cpp's own fallback)."
        )


def probability_spec(config: QLimitConfig) -> dict[str, Any]:
    """The attention probabilities' grid where it differs from the other activations' (bits, uniform / unit / log2)."""
    spec: dict[str, Any] = {}
    if getattr(config, "prob_bits", None) is not None:
        spec["p"] = config.prob_bits
    if getattr(config, "prob_grid", "uniform") != "uniform":
        spec["p_grid"] = config.prob_grid
    return spec
