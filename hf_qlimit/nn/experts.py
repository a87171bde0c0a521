"""Fused MoE experts (transformers 5's 3-D expert weights) with quantized weights.

An experts module holds one 3-D parameter per projection, [E, out, in] (or [E, in, out] where transformers' experts
interface says `is_transposed`), and its forward loops or batches over the experts. `QuantExperts` takes those
parameters over as `QuantExpertWeight`s, each an [E·out, in] matrix for the usual `WeightQuantizer`: one grid per
row, so each expert's output channels (and groups) get their own. Its forward runs the original module's own
forward (eager, batched or grouped, whichever transformers dispatches to) through `torch.func.functional_call`
with the dequantized 3-D weights, so routing, gating and biases stay the model's. The wrapped module keeps
placeholders of the weights taken over (nn/wrapping.py), so transformers' `_init_weights` still runs on it.

The experts' input (the routed hidden states) gets the input quantizer; the input of the second projection is
computed inside the experts' forward and stays in full precision. The router is not part of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantizers import ActQuantizer, first_token
from .modules import QuantWeightMixin
from .wrapping import call_with, take_parameter

PREFIX = "quantized_"


class QuantExpertWeight(QuantWeightMixin, nn.Module):
    """One fused expert weight as an [E·out, in] matrix on a per-row (per-group) grid; `expert_weight` gives it
    back in the experts module's own layout. It has no forward of its own: `QuantExperts` reads it."""

    def __init__(
        self,
        experts: int,
        out_features: int,
        in_features: int,
        transposed: bool,
        weight_bits: int,
        group_size: int | None = None,
        weight_sym: bool = False,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.experts, self.out_features, self.in_features = experts, out_features, in_features
        self.transposed = transposed
        if not frozen:
            self.weight = nn.Parameter(torch.empty(experts * out_features, in_features))
        self._init_weight(experts * out_features, in_features, weight_bits, group_size, weight_sym, frozen)
        self.bias = None

    @classmethod
    def empty_like(cls, param: torch.Tensor, transposed: bool, bits: int, group_size, sym: bool, frozen: bool):
        experts, a, b = param.shape
        out_features, in_features = (b, a) if transposed else (a, b)
        return cls(experts, out_features, in_features, transposed, bits, group_size, sym, frozen)

    @classmethod
    def from_parameter(cls, param: nn.Parameter, transposed: bool, bits: int, group_size, sym: bool):
        """Wraps the FP 3-D weight for calibration ([E, out, in] as a view, [E, in, out] as one transposed copy)."""
        module = cls.empty_like(param, transposed, bits, group_size, sym, frozen=False)
        weight = param.detach().transpose(1, 2) if transposed else param.detach()
        rows = weight.reshape(module.rows, module.cols)  # a view of the parameter where the layout allows
        module.weight = nn.Parameter(rows, requires_grad=param.requires_grad)
        return module

    def expert_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (fake-)quantized weight in the experts module's layout and `dtype`."""
        weight = self.quantized_weight().reshape(self.experts, self.out_features, self.in_features)
        return (weight.transpose(1, 2) if self.transposed else weight).to(dtype)

    def extra_repr(self) -> str:
        layout = "[E, in, out]" if self.transposed else "[E, out, in]"
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}, {layout}"


class QuantExperts(nn.Module):
    """A fused experts module whose 3-D weights are `QuantExpertWeight` children named "quantized_" + the parameter
    they replace (`mlp.experts.quantized_gate_up_proj.weight`: a name transformers' checkpoint conversions, which
    merge per-expert keys into `experts.gate_up_proj` on loading and split it on saving, leave alone); the module
    itself stays as `wrapped`, without those parameters, and its forward runs on the dequantized ones."""

    def __init__(
        self, wrapped: nn.Module, weights: dict[str, QuantExpertWeight], act_bits: int | None, act_sym: bool
    ) -> None:
        super().__init__()
        for name, weight in weights.items():
            self.add_module(PREFIX + name, weight)
        self.weight_names = tuple(weights)
        self.wrapped = wrapped
        self.input_quantizer = ActQuantizer(act_bits, act_sym) if act_bits is not None else None

    @classmethod
    def from_experts(
        cls,
        experts: nn.Module,
        params: dict[str, nn.Parameter],
        transposed: bool,
        spec: dict,
        group_size: int | None,
        weight_sym: bool,
        act_sym: bool,
        frozen: bool,
    ) -> QuantExperts:
        """Converts `experts` (whose 3-D weights are `params`): around its FP weights for calibration, or with
        empty packed weights (`frozen`) for a checkpoint to fill."""
        params = {name: take_parameter(experts, name) for name in params}  # ours now (nn/wrapping.py)
        if frozen:
            build = QuantExpertWeight.empty_like
            weights = {n: build(p, transposed, spec["w"], group_size, weight_sym, True) for n, p in params.items()}
        else:
            build = QuantExpertWeight.from_parameter
            weights = {n: build(p, transposed, spec["w"], group_size, weight_sym) for n, p in params.items()}
        return cls(experts, weights, spec.get("a"), act_sym)

    def expert_weights(self) -> dict[str, QuantExpertWeight]:
        """Parameter name of the wrapped module -> its quantized weight."""
        return {name: self.get_submodule(PREFIX + name) for name in self.weight_names}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.input_quantizer is not None:
            hidden_states = first_token.quantize_tokens(self.input_quantizer, hidden_states)
        weights = {name: w.expert_weight(hidden_states.dtype) for name, w in self.expert_weights().items()}
        return call_with(self.wrapped, weights, (hidden_states, *args), kwargs)

    def set_input_quantizer(self, quantizer: ActQuantizer) -> None:
        """Replaces the input quantizer (same child name): a dynamic per-token grid."""
        self.input_quantizer = quantizer

    def remove_input_quantizer(self) -> None:
        self.input_quantizer = None
