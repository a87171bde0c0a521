"""hf_qlimit: post-training quantization of transformers models with BRECQ / QDrop block reconstruction.

`import hf_qlimit` registers the "qlimit" quantization method with transformers (so `from_pretrained` loads
quantized checkpoints) and adds `PreTrainedModel.quantize_qlimit`.
"""

import logging as _logging

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .api import patch_pretrained_model, quantize
from .config import QLimitConfig
from .export import export  # the function; the package stays importable as hf_qlimit.export (python -m)
from .hf.quantizer import QLimitHfQuantizer
from .models import register_adapter, supported_model_types
from .nn.attention import register_attention
from .nn.modules import set_inference_mode
from .presets import PRESETS

# The trap in the line `from .export import export`: the attribute `hf_qlimit.export` is the function, shadowing
# the subpackage, so `import hf_qlimit.export as m` binds the function; reach the exporters with
# `from hf_qlimit.export import gguf` (or `compressed_tensors`).

__version__ = "0.1.0"

if "qlimit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config("qlimit")(QLimitConfig)
if "qlimit" not in AUTO_QUANTIZER_MAPPING:
    register_quantizer("qlimit")(QLimitHfQuantizer)
register_attention()
patch_pretrained_model()
# hf_qlimit's loggers follow transformers' verbosity and handler (`transformers.logging.set_verbosity_info()`).
_logging.getLogger("hf_qlimit").parent = _logging.getLogger("transformers")


def __getattr__(name: str):
    if name == "QuantizationArguments":  # moved to hf_qlimit.cli; the old import works for one more release
        import warnings

        from .cli import QuantizationArguments

        warnings.warn(
            "`from hf_qlimit import QuantizationArguments` is deprecated: use `from hf_qlimit.cli import "
            "QuantizationArguments`.",
            FutureWarning,
            stacklevel=2,
        )
        return QuantizationArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "QLimitConfig",
    "QLimitHfQuantizer",
    "export",
    "quantize",
    "register_adapter",
    "set_inference_mode",
    "supported_model_types",
]
