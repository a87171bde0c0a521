"""Quantized modules that replace `nn.Linear` (and `nn.Embedding`: embedding.py; the attention matmuls: attention.py).

Each module has two states. While calibrating it holds the FP weight and fake-quantizes it: to nearest, or as the
rounding state reconstruction attaches to its `WeightQuantizer` decides (AdaRound or sign rounding, possibly from
GPTQ's compensated weight; see quantizers/weight.py). `freeze()` turns the weight into packed integer codes; from then on, and after `from_pretrained`, the forward
pass works from those codes, so the in-memory and the reloaded model compute exactly the same thing.

A frozen module's inference mode (`inference_mode`, set through `set_inference_mode`; never saved):
- "packed" (the default): the weight stays packed. A weight-only Linear whose layout a torch int4 / int8
  kernel takes runs through it (bfloat16 activations, see kernels.py); other layers dequantize on the fly.
- "dequantize": dequantize on the fly in float, always; exact fake quantization (quantization uses it).
- "cached": the fast path for small models: one fp32 copy of the weight kept after the first forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..quantizers import ActQuantizer, WeightQuantizer, chunks, first_token
from ..quantizers.kquant import weight_quantizer_for
from . import kernels, memory
from .packing import pack_codes, packed_row_bytes, unpack_codes

logger = logging.get_logger(__name__)

INFERENCE_MODES = ("packed", "dequantize", "cached")
_KERNEL_BUFFERS = ("_kernel_weight", "_kernel_scales", "_kernel_offset")


class QuantWeightMixin:
    """Weight handling shared by `QuantLinear` and `QuantEmbedding`: rows are output channels.

    Frozen, `weight` is a flat uint8 buffer of packed codes. Flat on purpose: a transformers without hf_qlimit
    then fails loudly on the shape mismatch instead of reading codes as float weights. A Linear running through
    a kernel swaps that buffer for the kernel's layout (same bytes per code, device-specific, never saved):
    `state_dict()`, `.weight` and any `.to()` / `.float()` give back the hf_qlimit codes exactly.
    """

    weight_quantizer: WeightQuantizer
    inference_mode: str = "packed"  # one of INFERENCE_MODES (see the module's docstring), set_inference_mode's

    def _init_weight(
        self, rows: int, cols: int, bits: int, group_size: int | None, sym: bool, frozen: bool, fmt: str | None = None
    ) -> None:
        """`fmt`: the layer spec's weight format; a k-quant one gets its own quantizer (quantizers/kquant.py)."""
        self.rows, self.cols = rows, cols
        self.weight_quantizer = weight_quantizer_for(bits, (rows, cols), group_size, sym, fmt)
        self.is_frozen = frozen
        if frozen:
            self.register_buffer("weight", torch.zeros(rows * packed_row_bytes(cols, bits), dtype=torch.uint8))
        self.register_buffer("_dequantized", None, persistent=False)
        self._kernel: kernels.KernelPlan | None = None  # set while `weight` is held in a kernel's layout
        self._kernel_failed = False
        self._kernel_checked = False  # the kernel ran once without error

    @torch.no_grad()
    def freeze(self) -> None:
        """Round for good: keep only the packed integer codes of the weight."""
        bits = self.weight_quantizer.bits
        row_bytes = packed_row_bytes(self.cols, bits)
        # Rows pack independently: a chunk at a time, so no full-size code tensor exists next to the FP weight.
        packed = torch.empty(self.rows, row_bytes, dtype=torch.uint8, device=self.weight_quantizer.scale.device)
        for rows, codes in self.weight_quantizer.code_chunks(self.weight):
            packed[rows] = pack_codes(codes, bits)
        self.weight_quantizer.clear_rounding()
        del self.weight
        self.register_buffer("weight", packed.reshape(-1))
        self.is_frozen = True
        self._dequantized = None

    def release_fp_weight(self) -> None:
        """Once the quantizer's rounding state holds the rounding, the FP weight is needed no more (only its
        shape): it goes to `meta`."""
        if self.weight_quantizer.rounding is not None:
            self.weight = nn.Parameter(self.weight.to("meta"), requires_grad=False)

    def packed_weight(self) -> torch.Tensor:
        """The flat uint8 buffer of hf_qlimit codes (rebuilt exactly if the weight is in a kernel's layout)."""
        if self._kernel is None:  # the buffer itself (transformers flags it), uint8 again if stored back as int8
            codes = self._buffers["weight"]
            return codes if codes.dtype == torch.uint8 else codes.view(torch.uint8)
        return kernels.unpack(self._kernel, self._kernel_weight, self.rows, self.cols)

    def __getattr__(self, name: str):
        # `.weight` of a module whose codes sit in a kernel's layout (or in a tied head): the hf_qlimit codes
        held = "weight" in self.__dict__["_buffers"] or self.__dict__.get("_kernel") or self.__dict__.get("_tied_head")
        if name == "weight" and self.__dict__.get("is_frozen") and held:
            codes = self.packed_weight()
            if self.__dict__.get("_int8_weight"):  # see read_weight_as_int8
                codes = codes.view(torch.int8)
                codes._is_hf_initialized = True  # a fresh view: _init_weights would normal_-fill it on loading
            return codes
        return super().__getattr__(name)

    def read_weight_as_int8(self) -> None:
        """`.weight` of the frozen module reads as int8 codes (state_dict() keeps uint8): the dtype transformers'
        modeling code takes for "quantized, do not cast the input to it". The modules a family keeps in fp32 (T5's
        `wo`) get it: their callers cast the input to `.weight.dtype` otherwise, to uint8."""
        self._int8_weight = True

    def quantized_weight(self) -> torch.Tensor:
        """The float weight; frozen, it is cached only in the "cached" inference mode."""
        if not self.is_frozen:
            return self.weight_quantizer(self.weight)
        if self._has_cache():
            return self._dequantized
        weight = self.dequantize_rows()
        self._dequantized = weight if self.inference_mode == "cached" else None
        return weight

    def _has_cache(self) -> bool:
        return self._dequantized is not None and self._dequantized.device == self.weight_quantizer.scale.device

    def code_rows(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Unpacked codes of a frozen module, all rows or only `rows`, read from whatever layout holds them
        (an index tensor is gathered from the int8 kernel's layout, not unpacked whole)."""
        if isinstance(rows, torch.Tensor) and self._kernel is not None and self._kernel.kind == "int8":
            picked = self._kernel_weight.index_select(1, rows)  # (groups, n, group): q − 128
            return picked.permute(1, 0, 2).reshape(len(rows), self.cols).view(torch.uint8) ^ 0x80
        packed = self.packed_weight().reshape(self.rows, -1)
        return unpack_codes(packed if rows is None else packed[rows], self.weight_quantizer.bits, self.cols)

    def dequantize_rows(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float weight of a frozen module, all rows or only `rows` (a slice or index tensor)."""
        return self.weight_quantizer.dequantize(self.code_rows(rows), rows=rows)

    def invalidate_cache(self) -> None:
        self._dequantized = None
        self.release_kernel()

    def set_inference_mode(self, mode: str) -> None:
        """How this module computes once frozen (one of INFERENCE_MODES, see the module's docstring). Drops any
        cached weight or kernel layout, and lets a kernel that failed before be tried again."""
        _check_mode(mode)
        self.invalidate_cache()
        self._kernel_failed = False
        self.inference_mode = mode

    # -- kernel layout ---------------------------------------------------------------------------------------

    def _kernel_allowed(self) -> bool:
        """Packed mode, frozen, on a real device, and no accelerate hook that swaps `weight` in and out."""
        return (
            self.is_frozen
            and self.inference_mode == "packed"
            and not self._kernel_failed
            and getattr(self, "input_quantizer", None) is None
            and self.weight_quantizer.plain_grid  # the kernels take (q − zero)·scale, no further offset
            and "_hf_hook" not in self.__dict__  # accelerate sets it as a plain attribute
            and self.weight_quantizer.scale.device.type != "meta"
        )

    @torch.no_grad()
    def _take_kernel(self) -> bool:
        """Moves the codes into a kernel's layout if one fits; False (and dequantize per call) otherwise."""
        if self._kernel is not None:
            return True
        quantizer, packed = self.weight_quantizer, self.packed_weight()
        chosen = kernels.plan(quantizer.bits, self.rows, self.cols, quantizer.group_size, packed.device)
        if chosen is None:
            self._kernel_failed = True  # not a layout any kernel takes: decided once
            return False
        try:
            weight, scales, offset = kernels.prepare(chosen, packed, quantizer.scale, quantizer.zero, self.cols)
        except RuntimeError as err:  # an op this torch build lacks for the device: stay exact and slower
            logger.warning_once(
                f"No {chosen.kind} kernel for a {self.rows}x{self.cols} weight here ({err}); "
                "such layers dequantize at every call."
            )
            self._kernel_failed = True
            return False
        memory.drop_file_pages(packed)  # codes read from a mmap'ed checkpoint: their pages are dead weight now
        del self._buffers["weight"], packed
        for name, tensor in zip(_KERNEL_BUFFERS, (weight, scales, offset)):
            self.register_buffer(name, tensor, persistent=False)
        self._kernel = chosen
        # the int4 conversion's temporaries (uint8, then int32 codes: 5 bytes a weight) stay in glibc's heap otherwise
        memory.freed_temporaries(self.rows * self.cols * 5 if chosen.kind == "int4" else 0)
        return True

    @torch.no_grad()
    def release_kernel(self) -> None:
        """Back to hf_qlimit's packed codes (exact), e.g. before a move to another device."""
        if self._kernel is None:
            return
        packed = self.packed_weight()
        for name in _KERNEL_BUFFERS:
            self._buffers.pop(name, None)
        self._kernel = None
        self._kernel_checked = False
        self.register_buffer("weight", packed)
        memory.freed_temporaries(self.rows * self.cols)  # unpacking reads the codes back through uint8

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _PackedMatmul.apply(x, self) if x.requires_grad and torch.is_grad_enabled() else self._kernel_matmul(x)
        return y if self.bias is None else y + self.bias

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(self._kernel, x, self._kernel_weight, self._kernel_scales, self._kernel_offset, self.rows)

    def _apply(self, fn, recurse: bool = True):
        self.release_kernel()  # a kernel layout is tied to its device; taken again at the next forward
        self._kernel_failed = False
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.__dict__.get("_tied_head") is not None:  # a copy: the checkpoint keeps both modules' codes
            destination[prefix + "weight"] = self.packed_weight().clone()
        elif self._kernel is not None:
            destination[prefix + "weight"] = self.packed_weight()
        elif self.is_frozen and (held := destination[prefix + "weight"]).dtype == torch.int8:  # accelerate set it
            meta = held.device.type == "meta"  # offloaded: a placeholder of its own, not a view sharing one
            destination[prefix + "weight"] = (
                torch.empty_like(held, dtype=torch.uint8) if meta else held.view(torch.uint8)
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.release_kernel()
        if self.is_frozen and getattr(self._buffers.get("weight"), "dtype", None) == torch.int8:
            self._buffers["weight"] = self.packed_weight()  # load the bytes as they are, not cast to int8
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _PackedMatmul(torch.autograd.Function):
    """The kernel matmul, differentiable in its input (the kernels have no backward): ∂x = ∂y · W, with W
    dequantized for the backward pass only. The codes get no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantWeightMixin) -> torch.Tensor:
        ctx.module = module
        return module._kernel_matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.module.dequantize_rows().to(grad.dtype), None


def set_inference_mode(model: nn.Module, mode: str = "packed") -> nn.Module:
    """How the frozen quantized modules of `model` compute: "packed" (default: packed weights, int4 / int8
    kernels where the layout allows, no float copy), "dequantize" (dequantize in float at every call: exact fake
    quantization, slower) or "cached" (one fp32 copy per weight after the first forward: fastest on small models,
    8x the memory of a W4 weight)."""
    _check_mode(mode)  # also for a model without quantized modules
    for module in model.modules():
        if isinstance(module, QuantWeightMixin):
            module.set_inference_mode(mode)
    return model


def _check_mode(mode: str) -> None:
    if mode not in INFERENCE_MODES:
        raise ValueError(f"`mode` must be one of {sorted(INFERENCE_MODES)}, got {mode!r}.")


class QuantLinear(QuantWeightMixin, nn.Module):
    """`nn.Linear` with a quantized weight and, if `act_bits` is set, a quantized input."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_bits: int,
        act_bits: int | None,
        group_size: int | None = None,
        weight_sym: bool = False,
        act_sym: bool = False,
        frozen: bool = True,
        weight_format: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if not frozen:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._init_weight(out_features, in_features, weight_bits, group_size, weight_sym, frozen, weight_format)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_quantizer = ActQuantizer(act_bits, act_sym) if act_bits is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: dict, group_size, weight_sym, act_sym) -> QuantLinear:
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec["w"],
            spec.get("a"),
            group_size,
            weight_sym,
            act_sym,
            frozen=False,
            weight_format=spec.get("format"),
        )
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = first_token.quantize_tokens(self.input_quantizer, x)
        if not self.is_frozen and self.weight_quantizer.learning:
            return self.weight_quantizer.linear(x, self.bias)
        if self.is_frozen and self._kernel_allowed() and self._take_kernel():
            if self._kernel_checked:
                return self._kernel_forward(x)
            try:  # the first call tells whether this torch build runs the op on this device (CUDA int8 is recent)
                y = self._kernel_forward(x)
                self._kernel_checked = True
                return y
            except RuntimeError as err:  # NotImplementedError included
                logger.warning_once(
                    f"The {self._kernel.kind} kernel failed on {x.device} ({err}); such layers "
                    "dequantize at every call."
                )
                self.release_kernel()
                self._kernel_failed = True
        small = self.rows * self.cols <= chunks.ROW_CHUNK
        if not self.is_frozen or self._has_cache() or self.inference_mode == "cached" or small:
            return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)
        # No cache wanted: a large matrix (an LM head) is dequantized a slab at a time.
        outs = []
        for rows in chunks.row_slices(self.rows, self.cols):
            weight = self.dequantize_rows(rows).to(x.dtype)
            outs.append(F.linear(x, weight, None if self.bias is None else self.bias[rows]))
        return torch.cat(outs, dim=-1)

    def set_input_quantizer(self, quantizer: ActQuantizer) -> None:
        """Replaces the input quantizer (same child name, so the checkpoint's keys stay): a dynamic per-token grid,
        or the quantizer of a sibling Linear that reads the same tensor (act_layout="shared")."""
        self.input_quantizer = quantizer

    def remove_input_quantizer(self) -> None:
        """Drops the input quantizer (one calibration never reached: the layer then runs on FP inputs)."""
        self.input_quantizer = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
