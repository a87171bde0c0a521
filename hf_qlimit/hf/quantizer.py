"""The `HfQuantizer` that lets `from_pretrained` rebuild a qlimit checkpoint: thin glue, no math."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils import logging

from ..config import QLimitConfig
from ..quantizers import ActQuantizer, WeightQuantizer
from .surgery import convert_model, quantized_modules, share_tied_codes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.get_logger(__name__)


def _quantized_and_activation_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules whose tensors a checkpoint must hold: quantized layers and their quantizers."""
    for name, module in model.named_modules():
        if isinstance(module, (ActQuantizer, WeightQuantizer)) or hasattr(module, "weight_quantizer"):
            yield name, module


class QLimitHfQuantizer(HfQuantizer):
    """Loads models quantized by `quantize_qlimit`; quantizing happens there, with calibration data."""

    requires_calibration = True
    quantization_config: QLimitConfig
    failed = False  # quantize_qlimit stopped half-way (see `mark_failed`): such a model must not be saved

    def mark_failed(self) -> None:
        """The quantization of this model stopped half-way: `save_pretrained` will refuse it."""
        self.failed = True

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.quantization_config.layer_config:
            raise ValueError(
                "This quantization_config has no `layer_config`, so it describes no quantized checkpoint. To quantize "
                "a model, load it in full precision and call `model.quantize_qlimit(calib_ds, QLimitConfig(...))`."
            )

    def update_attn_implementation(self, config):
        if any(spec["kind"] == "attention" for spec in self.quantization_config.layer_config.values()):
            from ..nn.attention import register_attention

            register_attention()
            config._attn_implementation = "qlimit"
        return config

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> None:
        convert_model(model, self.quantization_config.layer_config, self.quantization_config, frozen=True)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        # transformers flags every tensor it read from the checkpoint; a quantized tensor it had to make up
        # (zeros, ones) would give a silently wrong model, so refuse it.
        missing = []
        for name, module in _quantized_and_activation_modules(model):
            for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                persistent = tensor_name not in module._non_persistent_buffers_set
                if persistent and tensor.device.type != "meta" and not getattr(tensor, "_is_hf_initialized", False):
                    missing.append(f"{name}.{tensor_name}")
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} quantized tensors (first: {missing[:3]}): it is truncated, "
                "corrupt, or written by another hf_qlimit version. Quantize the full-precision model again."
            )
        for _, module in quantized_modules(model):
            module.invalidate_cache()
        share_tied_codes(model)  # an embedding tied to the head in FP: one copy of their equal codes
        return model

    def is_serializable(self) -> bool:
        if self.failed:
            logger.error("This model's quantization failed half-way; it cannot be saved. Reload it and quantize again.")
        return not self.failed

    @property
    def is_trainable(self) -> bool:
        return False
