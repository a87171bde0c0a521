"""Which modules of a model compute attention through transformers' attention interface, found by running it.

`record_attention_calls(model)` switches the model (and every submodel: both stacks of an encoder-decoder) to
the "qlimit" attention function for the duration of a forward pass and records the modules that call it. Only
their Q·Kᵀ and P·V matmuls can be quantized. A model with its own attention code (DeBERTa-v2's disentangled
attention) cannot switch and records nothing; `attention_refusal` words the error for such a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import transformers
from torch import nn
from transformers import PreTrainedModel

from .attention import attention_calls, register_attention

IMPLEMENTATION = "qlimit"


@dataclass
class AttentionCalls:
    """What one `record_attention_calls` context saw.

    calls: the name of the module behind each call of the attention function, in call order (a module called
        twice, like ALBERT's shared layer, appears twice).
    refused: module name -> the keyword arguments it passed that "qlimit" attention does not know; these calls
        ran the family's own eager function, and the module's attention matmuls cannot be quantized.
    unsupported: the (sub)models that could not switch to "qlimit" attention because they do not use the
        attention interface ("" is the model itself), once per config.
    """

    calls: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The calling modules' names, each once, in the order of their first call."""
        return list(dict.fromkeys(self.calls))


@contextmanager
def record_attention_calls(model: nn.Module) -> Iterator[AttentionCalls]:
    """Records the modules that call the attention interface while the context is open.

    Run the model's forward pass inside the context; the result is filled in when the context closes::

        with record_attention_calls(model) as found:
            model(**batch)
        found.names  # e.g. ["model.layers.0.self_attn", "model.layers.1.self_attn"]

    Inside, the model computes attention with "qlimit": eager attention, with the matmul quantizers where they
    are attached and enabled, the same outputs as "eager" otherwise (masks are built as for "eager"). Every
    submodel gets its own attention implementation back afterwards; a model already on "qlimit" stays on it.
    """
    register_attention()
    found = AttentionCalls()
    saved = [(config, config._attn_implementation) for config in _configs(model)]
    try:
        with attention_calls() as calls:
            if isinstance(model, PreTrainedModel):
                with _quiet_transformers():
                    model.set_attn_implementation(IMPLEMENTATION)
            found.unsupported = not_switched(model)
            yield found
    finally:
        for config, implementation in saved:  # parents first: a parent's setter also resets its sub-configs
            config._attn_implementation = implementation
    names = {id(module): name for name, module in model.named_modules()}
    for call in calls:
        name = names.get(id(call.module), f"<{type(call.module).__name__} outside the model>")
        found.calls.append(name)
        if call.unknown:
            found.refused[name] = sorted({*found.refused.get(name, ()), *call.unknown})


def use_qlimit_attention(model: nn.Module) -> None:
    """Switches `model` and its submodels to "qlimit" attention for good, so that the attention quantizers of
    a converted model take effect; raises `attention_refusal`'s error where a submodel cannot switch."""
    register_attention()
    with _quiet_transformers():
        model.set_attn_implementation(IMPLEMENTATION)
    unsupported = not_switched(model)
    if unsupported:
        raise attention_refusal(model, AttentionCalls(unsupported=unsupported))


def not_switched(model: nn.Module) -> list[str]:
    """The (sub)models of `model` that do not compute attention with "qlimit" ("" is the model itself), the
    outermost one of each config: their implementation is another, or their class does not use the attention
    interface at all (a config loaded with "qlimit" says nothing about the code: DeBERTa-v2 from a checkpoint)."""
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        can_switch = getattr(type(module), "_can_set_attn_implementation", None)  # transformers' own test
        if module.config._attn_implementation != IMPLEMENTATION or (can_switch is not None and not can_switch()):
            found.setdefault(id(module.config), name)
    return list(found.values())


def attention_refusal(model: nn.Module, found: AttentionCalls) -> ValueError | None:
    """The error to raise when attention-matmul quantization is asked for (`quantize_attention` with activation
    bits) but `found` shows that it would not reach every attention of `model`; None when it would."""
    if found.calls and not found.unsupported and not found.refused:
        return None
    if found.unsupported:
        where = ", ".join(repr(n) if n else type(model).__name__ for n in found.unsupported)
        why = f"{where} computes attention with its own code, not through transformers' attention interface"
    elif found.refused:
        name, unknown = next(iter(found.refused.items()))
        why = f"{name!r} (and {len(found.refused) - 1} more) passes {unknown}, which qlimit's attention does not know"
    else:
        why = "no module called transformers' attention interface in a forward pass"
    return ValueError(
        f"{type(model).__name__}: {why}, so hf_qlimit cannot quantize the inputs of its Q·Kᵀ and P·V matmuls (they "
        "would stay in full precision). Quantize it with `quantize_attention=False`: the Linears' weights and "
        "inputs are still quantized."
    )


def _configs(model: nn.Module) -> list:
    """Every config of `model` and its submodels, parents before their sub-configs, each once."""
    queue = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    seen: dict[int, object] = {}
    while queue:
        config = queue.pop(0)
        if id(config) not in seen:
            seen[id(config)] = config
            queue += [c for key in config.sub_configs if (c := getattr(config, key, None)) is not None]
    return list(seen.values())


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    # set_attn_implementation only logs a warning where a model cannot switch; callers get `unsupported`.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
