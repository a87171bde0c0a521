"""Module surgery: swap the modules named in a layer config for their quantized counterparts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import QLimitConfig
from .modules import ATTENTION_ATTR, AttentionQuantizers, QuantEmbedding, QuantLinear, register_attention
from .quantizers import ActQuantizer, WeightQuantizer


def _empty_module(module: nn.Module, spec: dict, config: QLimitConfig) -> nn.Module:
    if spec["kind"] == "linear":
        return QuantLinear(module.in_features, module.out_features, module.bias is not None, spec["w"], spec.get("a"),
                           config.group_size, config.weight_sym, config.act_sym, frozen=True)  # fmt: skip
    return QuantEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, spec["w"],
                          config.weight_sym, frozen=True)  # fmt: skip


def convert_model(model: nn.Module, layer_config: dict[str, dict], config: QLimitConfig, frozen: bool) -> None:
    """Replaces every module of `layer_config`.

    frozen=False wraps the existing FP weights for calibration; frozen=True builds empty modules whose packed
    weights `from_pretrained` then loads.
    """
    expected = {"linear": nn.Linear, "embedding": nn.Embedding}
    for name, spec in layer_config.items():
        module = model.get_submodule(name)
        if spec["kind"] == "attention":
            with torch.device(_device_of(module)):
                setattr(module, ATTENTION_ATTR, AttentionQuantizers(spec["a"], config.act_sym))
            continue
        if type(module) is not expected[spec["kind"]]:
            raise ValueError(
                f"The checkpoint's quantization_config says {name!r} is a quantized {spec['kind']}, but the model has "
                f"a {type(module).__name__} there: the checkpoint does not belong to this model class."
            )
        with torch.device(_device_of(module)):  # quantizer buffers next to the weight (CUDA, not CPU)
            if frozen:
                new = _empty_module(module, spec, config)
            elif spec["kind"] == "linear":
                new = QuantLinear.from_linear(module, spec, config.group_size, config.weight_sym, config.act_sym)
            else:
                new = QuantEmbedding.from_embedding(module, spec, config.weight_sym)
        model.set_submodule(name, new)
    if any(spec["kind"] == "attention" for spec in layer_config.values()):
        register_attention()
        model.set_attn_implementation("qlimit")
    _untie_quantized_embeddings(model, layer_config)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _untie_quantized_embeddings(model: nn.Module, layer_config: dict[str, dict]) -> None:
    # A quantized input embedding and LM head each keep their own codes (and the head its input quantizer),
    # so the saved model must not tie them back together.
    tied = {id(model.get_input_embeddings()), id(getattr(model, "get_output_embeddings", lambda: None)())}
    if any(id(module) in tied for name, module in model.named_modules() if name in layer_config):
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def quantized_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, (QuantLinear, QuantEmbedding)):
            yield name, child


def act_quantizers(module: nn.Module) -> Iterator[ActQuantizer]:
    return (m for m in module.modules() if isinstance(m, ActQuantizer))


@contextmanager
def quant_state(module: nn.Module, weights: bool, acts: bool) -> Iterator[None]:
    """Temporarily switch weight and activation quantization inside `module` on or off."""
    quantizers = [m for m in module.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    saved = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = weights if isinstance(q, WeightQuantizer) else acts
    try:
        yield
    finally:
        for q, enabled in zip(quantizers, saved):
            q.enabled = enabled
