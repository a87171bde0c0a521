"""Module surgery: swap the modules named in a layer config for their quantized counterparts."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..config import QLimitConfig
from ..models.base import input_output_embeddings
from ..nn.attention import ATTENTION_ATTR, AttentionQuantizers
from ..nn.attention_probe import use_qlimit_attention
from ..nn.embedding import QuantEmbedding
from ..nn.modules import QuantLinear, QuantWeightMixin
from ..quantizers import ActQuantizer, first_token
from ..quantizers.act_grids import DynamicTokenQuantizer
from ..transforms.input_op import KIND as INPUT_TRANSFORM
from ..transforms.input_op import InputTransform
from .layer_kinds import quantized_module

OUTPUT_QUANTIZER = "output_quantizer"


def convert_model(model: nn.Module, layer_config: dict[str, dict], config: QLimitConfig, frozen: bool) -> None:
    """Replaces every module of `layer_config`.

    frozen=False wraps the existing FP weights for calibration; frozen=True builds empty modules whose packed
    weights `from_pretrained` then loads.
    """
    from ..models import get_adapter, is_causal_lm

    # The config checked its own fields when it was built; what needs the model is checked here.
    if config.act_fp_first_token and config.act_bits is not None and not is_causal_lm(model):
        raise ValueError(
            "`act_fp_first_token` keeps the attention sink (position 0) of decoder LMs in full precision; "
            f"{type(model).__name__} is not a decoder LM. Leave it False."
        )
    for name, spec in layer_config.items():
        module = model.get_submodule(name)
        if spec["kind"] == INPUT_TRANSFORM:  # a transform's explicit op: rebuilt around the Linear before loading
            if not isinstance(module, InputTransform):
                parent, _, child = name.rpartition(".")
                model.get_submodule(parent).add_module(child, InputTransform.from_spec(module, spec))
            continue
        if spec["kind"] == "block_output":
            add_output_quantizer(module, ActQuantizer(spec["a"], config.act_sym).to(_device_of(module)))
            continue
        if spec["kind"] == "attention":
            with torch.device(_device_of(module)):
                quantizers = AttentionQuantizers(
                    spec["a"], config.act_sym, spec.get("p"), spec.get("p_grid", "uniform")
                )
            module.add_module(ATTENTION_ATTR, quantizers)
            continue
        with torch.device(_device_of(module)):  # quantizer buffers next to the weight (CUDA, not CPU)
            new = quantized_module(name, module, spec, config, frozen)
        if spec.get("dynamic") and getattr(new, "input_quantizer", None) is not None:
            new.set_input_quantizer(DynamicTokenQuantizer(spec["a"], config.act_sym).to(_device_of(new)))
        if _kept_in_fp32(model, name) and hasattr(new, "read_weight_as_int8"):
            new.read_weight_as_int8()
        model.set_submodule(name, new)
    if config.act_layout in ("shared", "block_output"):
        share_input_quantizers(model, layer_config)
    if config.act_fp_first_token and config.act_bits is not None:
        first_token.hook_blocks(get_adapter(model).blocks(model))
    if any(spec["kind"] == "attention" for spec in layer_config.values()):
        use_qlimit_attention(model)  # every submodel (both stacks of T5); raises where one has its own attention
    _untie_quantized_embeddings(model, layer_config)


def share_input_quantizers(model: nn.Module, layer_config: dict[str, dict]) -> None:
    """act_layout="shared": the Linears that read one tensor (the adapter's groups: Q/K/V, gate/up) get one
    ActQuantizer object, as a deployed integer model quantizes that tensor once. Saved once per Linear (equal
    copies); rebuilding the model ties them again before the values are loaded."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    if not any(rel for group in adapter.input_groups() for rel in group):
        return  # no adapter: the groups are not known, each Linear keeps its own quantizer
    blocks = adapter.blocks_name(model) + "."
    touched = {name[len(blocks) :].split(".", 1)[0] for name in layer_config if name.startswith(blocks)}
    for index in sorted(touched):
        block = model.get_submodule(blocks + index)
        for group in adapter.input_groups():
            linears = [_inner_linear(block.get_submodule(rel)) for rel in group if rel]
            if len(linears) < 2 or not all(
                isinstance(m, QuantLinear) and m.input_quantizer is not None for m in linears
            ):
                continue
            for linear in linears[1:]:
                linear.set_input_quantizer(linears[0].input_quantizer)


def add_output_quantizer(block: nn.Module, quantizer: ActQuantizer) -> None:
    """Quantizes what `block` returns (its hidden states), as a child module so the grid is saved and learned."""
    if getattr(block, OUTPUT_QUANTIZER, None) is None:
        block.register_forward_hook(_quantize_output)
    block.add_module(OUTPUT_QUANTIZER, quantizer)  # a transformers block: nn.Module's own way to add a child


def _quantize_output(block: nn.Module, args, output):
    quantizer = getattr(block, OUTPUT_QUANTIZER)
    if isinstance(output, tuple):
        return (quantizer(output[0]), *output[1:])
    return quantizer(output)


def _inner_linear(module: nn.Module) -> nn.Module:
    return module.linear if isinstance(module, InputTransform) else module


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _untie_quantized_embeddings(model: nn.Module, layer_config: dict[str, dict]) -> None:
    # A quantized input embedding and LM head each keep their own codes (and the head its input quantizer), so the
    # saved model must not tie them back together: the config says so where every tie it governs names a quantized
    # module (a tied Llama); elsewhere (BART's stacks share an FP table) only those ties leave the tie table.
    ties = model.get_expanded_tied_weights_keys(all_submodels=True).items()
    touched = [pair for pair in ties if {_module_of(n) for n in pair} & layer_config.keys()]
    if touched and len(touched) == len(ties):
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
    _drop_quantized_ties(model, layer_config)


def _drop_quantized_ties(model: nn.Module, layer_config: dict[str, dict]) -> None:
    """Ties that name a quantized module leave transformers' tie table (`all_tied_weights_keys`, per submodel):
    some configs force ties whatever `tie_word_embeddings` says (T5 ties both stacks' embeddings to `shared`), and
    a tie to a quantized module's codes would overwrite them on loading, or drop them on saving."""
    for prefix, sub in model.named_modules(remove_duplicate=False):
        ties = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(ties, dict) or not ties:
            continue
        dot = f"{prefix}." if prefix else ""
        kept = {k: v for k, v in ties.items() if not {_module_of(dot + k), _module_of(dot + v)} & layer_config.keys()}
        if len(kept) != len(ties):
            sub.all_tied_weights_keys = kept


def _kept_in_fp32(model: nn.Module, name: str) -> bool:
    """Whether transformers keeps module `name` in fp32 (`_keep_in_fp32_modules`: T5's `wo`)."""
    kept = {
        *(getattr(model, "_keep_in_fp32_modules", None) or ()),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
    }
    return any(part in kept for part in name.split("."))


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


@torch.no_grad()
def share_tied_codes(model: nn.Module) -> bool:
    """An embedding and LM head that were tied in FP and got the same 8-bit codes and grid keep one copy of
    the codes in memory (the head's; the embedding gathers its rows from it). The checkpoint keeps both, so
    it stays an ordinary one. Returns whether they were shared."""
    emb, head = input_output_embeddings(model)
    if not (isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)) or emb.reads_head_codes:
        return False
    qe, qh = emb.weight_quantizer, head.weight_quantizer
    if (
        not (emb.is_frozen and head.is_frozen)
        or head.input_quantizer is not None
        or (emb.rows, emb.cols, qe.bits, qe.group_size, qe.symmetric)
        != (head.rows, head.cols, 8, qh.group_size, qh.symmetric)
        or qh.bits != 8  # only byte-wide codes gather cheaply from the head's kernel layout
        or "_hf_hook" in emb.__dict__
        or "_hf_hook" in head.__dict__
        or qe.scale.device != qh.scale.device
    ):
        return False
    if not (
        torch.equal(qe.scale, qh.scale)
        and torch.equal(qe.zero, qh.zero)
        and torch.equal(emb.packed_weight(), head.packed_weight())
    ):
        return False
    emb.tie_codes(head)
    return True


def quantized_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module holding a quantized weight: QuantLinear, QuantEmbedding (and its wrapping subclass), and each
    3-D weight of a QuantExperts (a `QuantExpertWeight`; the experts module itself holds none)."""
    for name, child in module.named_modules():
        if isinstance(child, QuantWeightMixin):
            yield name, child
