"""What every export format shares: its error type and loading a quantized folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn


class ExportError(ValueError):
    """The model holds something the target format cannot express; the message says what and how to change it."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.gguf",  # the source GGUF's tokenizer keys (hf_qlimit.cli.gguf_to_hf), which GGUF export reuses
)


def refuse_input_transforms(model: nn.Module, format: str) -> None:
    """Explicit input transforms (shift, smoothing, online Hadamard rotation before a Linear, see
    hf_qlimit.transforms) are ops of their own that these formats have no slot for."""
    from ..transforms.input_op import InputTransform

    found = [name for name, m in model.named_modules() if isinstance(m, InputTransform)]
    if found:
        raise ExportError(
            f"{len(found)} Linears run behind an explicit input transform (first: {found[0]!r}: shift, smoothing or an "
            f"online Hadamard rotation); {format} cannot express it. Quantize with `transforms=[]` (the defaults rotate "
            "inputs at 4-bit activations and decoder LMs' FFN down input), or with transforms absorbed into the "
            "weights, to export."
        )


def load_quantized(folder: str | Path) -> nn.Module:
    """The hf_qlimit model saved in `folder`, built from the class its config names, on CPU, in eval mode."""
    import transformers
    from transformers import AutoConfig

    import hf_qlimit  # noqa: F401  (registers the qlimit quantizer with transformers)

    config = AutoConfig.from_pretrained(folder)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if method != "qlimit":
        raise ExportError(f"{folder} is not an hf_qlimit checkpoint (quantization method {method!r}).")
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise ExportError(f"{folder}/config.json names no transformers architecture ({architectures!r}).")
    return model_cls.from_pretrained(folder).eval()


def copy_tokenizer(src: Path, dst: Path, overwrite: bool = True) -> list[str]:
    """Copies the tokenizer files of folder `src` into `dst` (with `overwrite=False`, only those `dst` lacks);
    returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (overwrite or not (dst / name).exists()):
            (dst / name).write_bytes((src / name).read_bytes())
            copied.append(name)
    return copied
