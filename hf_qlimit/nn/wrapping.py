"""Taking a parameter over from a module that keeps its own forward (`QuantWrappedEmbedding`, `QuantExperts`).

The module stays in the model, so that transformers still recognises it: its `_init_weights` fills the module's
non-persistent buffers on loading (Gemma's `embed_scale`). What the wrapper takes over is left behind as a
non-persistent placeholder of no elements, with the parameter's leading dimensions and dtype, so the family's
`_init_weights` (which indexes `weight[padding_idx]`, or normal_-fills the experts) still runs on it. The
placeholder's dtype follows `.to()`: the wrapper hands its tensors over in that dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def take_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """Removes parameter `name` from `module` and returns it; a placeholder buffer takes its place."""
    param = getattr(module, name)
    delattr(module, name)  # nn.Module's own removal of a registered parameter
    placeholder = torch.empty(*param.shape[:-1], 0, dtype=param.dtype, device=param.device)
    module.register_buffer(name, placeholder, persistent=False)
    return param


def placeholder_dtype(module: nn.Module, name: str) -> torch.dtype:
    """The dtype of the parameter `take_parameter` took, as `.to()` has moved it since."""
    return module.get_buffer(name).dtype


def call_with(module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """`module`'s own forward, reading `tensors` in place of the parameters taken over."""
    return functional_call(module, tensors, args, kwargs)
