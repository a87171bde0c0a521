"""Which quantized module a model's module becomes: the one place that decides a layer's kind.

- "linear": `nn.Linear`, and a subclass whose forward is nn.Linear's or gives F.linear's result on a small random
  input (FalconLinear's `x @ W.T + b`). A subclass that computes something else stays in full precision, with a
  warning that names it.
- "conv1d": transformers' `Conv1D` (GPT-2), weight stored [in, out]; it becomes a `QuantLinear` on the [out, in]
  view, and a checkpoint rebuilds that QuantLinear from the Conv1D of the skeleton.
- "embedding": `nn.Embedding` and its subclasses. A subclass with its own forward (Gemma's scaled lookup) keeps
  it (`QuantWrappedEmbedding`); only the model's input embedding is such a subclass worth its cost, so another
  one (OPT's learned positions, whose forward computes positions from the mask) stays in FP with a warning.
- "experts": transformers' fused MoE experts, one 3-D parameter [E, out, in] per projection, each expert's rows on
  their own grid (`QuantExperts`). The layout comes from transformers' experts interface (`is_transposed`); an
  experts module without it is refused, since [E, out, in] and [E, in, out] cannot be told apart by shape.

A router (a Linear named gate/router beside an MoE block's experts) stays in full precision, as the peers keep it.
Nothing here imports the calibration engine: a checkpoint's loading uses it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from ..nn.embedding import QuantEmbedding
from ..nn.experts import QuantExperts
from ..nn.modules import QuantLinear
from ..nn.wrapped_embedding import QuantWrappedEmbedding
from ..quantizers.kquant import K_LAYOUTS

if TYPE_CHECKING:
    from ..config import QLimitConfig

logger = logging.get_logger(__name__)

LINEAR_KINDS = ("linear", "conv1d")  # both become a QuantLinear
MATMUL_KINDS = (*LINEAR_KINDS, "experts")  # weight and input bits of a projection
WEIGHT_KINDS = (*LINEAR_KINDS, "embedding", "experts")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_PROBE_ROWS = 2


def layer_kind(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The kind of `module` (named `name` in `model`), one of WEIGHT_KINDS, or None when it is no layer that
    hf_qlimit quantizes. Logs every layer-like module left in full precision, and raises for fused experts whose
    layout it cannot tell."""
    if isinstance(module, nn.Linear):
        if _is_router(model, name):
            logger.info_once(f"{name}: the MoE router stays in full precision.")
            return None
        return "linear" if _plain_matmul(name, module, transposed=False) else None
    if isinstance(module, Conv1D):
        return "conv1d" if _plain_matmul(name, module, transposed=True) else None
    if isinstance(module, nn.Embedding):
        if not isinstance(getattr(module, "weight", None), nn.Parameter):  # inside a converted one (nn/wrapping.py)
            return None
        if type(module).forward is nn.Embedding.forward or module is _input_embedding(model):
            return "embedding"
        logger.warning_once(
            f"{name} ({type(module).__name__}) is an Embedding with its own forward that is not the model's input "
            "embedding: it stays in full precision."
        )
        return None
    if expert_weights(module):
        expert_layout(name, module)  # refuses an unknown layout here, before anything is converted
        return "experts"
    return None


def matmul_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear (a QuantLinear too) or a Conv1D (whose weight is [in, out])."""
    return (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features, module.in_features)


def matmul_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a "linear" or "conv1d" module (a transposed view for Conv1D)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_stored(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An [out, in] `weight` in the layout `module` stores its weight in (back from `matmul_weight`'s view)."""
    return weight.t() if isinstance(module, Conv1D) else weight


def as_linear(module: nn.Module) -> nn.Linear:
    """A Linear holding a Conv1D's parameters as [out, in] (one transposed copy), or the Linear itself."""
    if not isinstance(module, Conv1D):
        return module
    out_features, in_features = matmul_shape(module)
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
    weight = module.weight.detach().t().contiguous()
    linear.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))
    linear.register_parameter("bias", module.bias)
    return linear


def expert_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> 3-D weight of a fused experts module (each [num_experts, ·, ·]); {} for any other module."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    experts = getattr(module, "num_experts", None)
    if not params or not (isinstance(experts, int) or type(module).__name__.endswith("Experts")):
        return {}
    if not isinstance(experts, int):
        experts = next(iter(params.values())).shape[0]
    return params if all(p.shape[0] == experts for p in params.values()) else {}


def expert_layout(name: str, module: nn.Module) -> bool:
    """Whether the experts' weights are stored [E, in, out] (transposed) rather than [E, out, in], from
    transformers' experts interface; refuses a module that does not say."""
    transposed = getattr(module, "is_transposed", None)
    if transposed is not True and transposed is not False:
        raise ValueError(
            f"{name} ({type(module).__name__}) holds fused expert weights "
            f"{ {n: tuple(p.shape) for n, p in expert_weights(module).items()} } but does not use transformers' "
            "experts interface (`is_transposed`), so hf_qlimit cannot tell which dimension is the input one. Add "
            f"{name!r} to `modules_to_not_convert` to keep these experts in full precision."
        )
    return transposed


def _input_embedding(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _is_router(model: nn.Module, name: str) -> bool:
    """A Linear named like a router beside the `experts` of its parent (Qwen2-MoE's gates, older MoE blocks)."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in ROUTER_NAMES:
        return False
    block = model.get_submodule(parent) if parent else model
    return isinstance(getattr(block, "experts", None), nn.Module)


@torch.no_grad()
def _plain_matmul(name: str, module: nn.Module, transposed: bool) -> bool:
    """Whether `module` computes x·Wᵀ + b (x·W + b for Conv1D): its class keeps the base forward, or its forward
    gives that on a small random input. Warns when not."""
    if type(module).forward is (Conv1D if transposed else nn.Linear).forward:
        return True
    weight = module.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        reason = "its weight is not a materialised float tensor, so its forward could not be checked"
    elif _probe_matches(module, weight, transposed):
        return True
    else:
        reason = "its forward does not compute a plain matmul"
    logger.warning_once(f"{name} ({type(module).__name__}) stays in full precision: {reason}.")
    return False


def _probe_matches(module: nn.Module, weight: torch.Tensor, transposed: bool) -> bool:
    """The class's forward (without hooks) on a small random input equals the plain matmul's."""
    generator = torch.Generator().manual_seed(0)  # the global RNG stays as it was
    x = torch.randn(1, _PROBE_ROWS, matmul_shape(module)[1], generator=generator).to(weight.device, weight.dtype)
    expected = F.linear(x, weight.t() if transposed else weight, module.bias)
    try:
        got = type(module).forward(module, x)
    except Exception:  # noqa: BLE001  (any failure means: not a plain matmul)
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    return torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol * float(expected.abs().max()))


def quantized_module(name: str, module: nn.Module, spec: dict, config: QLimitConfig, frozen: bool) -> nn.Module:
    """The quantized replacement of `module` for its layer-config `spec`: around its FP weights for calibration,
    or empty (`frozen`) for a checkpoint's packed weights. Refuses a module of another kind than the spec's."""
    kind = spec["kind"]
    _check_fits(name, module, kind)
    w, a, a_sym = spec["w"], spec.get("a"), config.act_sym
    # a weight format (GGUF) gives a module its own grid; otherwise the config's
    group, w_sym = spec.get("group", config.group_size), spec.get("sym", config.weight_sym)
    if kind in LINEAR_KINDS:
        if not frozen:
            return QuantLinear.from_linear(as_linear(module), spec, group, w_sym, a_sym)
        out_features, in_features = matmul_shape(module)
        bias = module.bias is not None
        return QuantLinear(in_features, out_features, bias, w, a, group, w_sym, a_sym, True, spec.get("format"))
    if kind == "embedding":
        if type(module).forward is not nn.Embedding.forward:
            return QuantWrappedEmbedding.from_module(module, spec, w_sym, frozen)
        if not frozen:
            return QuantEmbedding.from_embedding(module, spec, w_sym)
        dims = (module.num_embeddings, module.embedding_dim, module.padding_idx)
        return QuantEmbedding(*dims, w, w_sym, True, spec.get("group"), spec.get("format"))
    if spec.get("format") in K_LAYOUTS:
        logger.info_once(
            f"Fused MoE experts take {spec['format']}'s sub-block grid ({w} bits, groups of {group}) without its "
            "super-blocks, so they are no k-quant tensors in a GGUF export."
        )
    transposed = expert_layout(name, module)
    return QuantExperts.from_experts(module, expert_weights(module), transposed, spec, group, w_sym, a_sym, frozen)


def _check_fits(name: str, module: nn.Module, kind: str) -> None:
    fits = {
        "linear": isinstance(module, nn.Linear),
        "conv1d": isinstance(module, Conv1D),
        "embedding": isinstance(module, nn.Embedding),
        "experts": bool(expert_weights(module)),
    }
    if not fits.get(kind, False):
        raise ValueError(
            f"The checkpoint's quantization_config says {name!r} is a quantized {kind}, but the model has "
            f"a {type(module).__name__} there: the checkpoint does not belong to this model class."
        )
