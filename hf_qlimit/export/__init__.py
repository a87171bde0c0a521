"""Export a quantized model to formats other tools load without hf_qlimit.

hf_qlimit.export(model_or_folder, out_dir, format="compressed-tensors")
python -m hf_qlimit.export IN_DIR OUT_DIR --format compressed-tensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .common import ExportError, copy_tokenizer, load_quantized

FORMATS = ("compressed-tensors", "gguf")


def export(
    model_or_folder: nn.Module | str | Path,
    out_dir: str | Path,
    format: str = "compressed-tensors",
    allow_unservable: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Writes a quantized hf_qlimit model (or the folder it was saved to) to `out_dir` in `format`.

    - "compressed-tensors": a transformers folder that plain transformers + the `compressed-tensors` package
      load (the format vLLM reads; not tried with vLLM here): weight-only Linears as `pack-quantized`, W8A8 as
      `int-quantized` with static input scales, symmetric weight-only MoE experts as one Linear per expert.
      Quantized embeddings are written dequantized; Conv1D (GPT-2) is refused.
    - "gguf": one `model.gguf` that llama.cpp runs as it is (weights in the GGUF block types that hold their codes
      exactly, hyper-parameters, tokenizer), see `export/gguf.py`; the tokenizer is read from the folder.

    `tokenizer` (a tokenizer or its folder; GGUF only, which needs one) defaults to `model_or_folder` when that is
    a folder. Settings the format cannot express raise `ExportError` naming them. `allow_unservable=True` exports
    asymmetric 2/3-bit weights anyway (compressed-tensors stores them; vLLM's kernels, by its docs, take asymmetric weights only at 4 and 8 bits).
    Returns the folder (or file) written.
    """
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {list(FORMATS)}.")
    source = None
    if isinstance(model_or_folder, (str, Path)):
        source = Path(model_or_folder)
        model = load_quantized(source)
    else:
        model = model_or_folder
    out_dir = Path(out_dir)
    if format == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        written = export_compressed_tensors(model, out_dir, allow_unservable=allow_unservable)
    else:
        from .gguf import export_gguf

        written = export_gguf(model, out_dir, tokenizer=tokenizer if tokenizer is not None else source)
    if source is not None:
        copy_tokenizer(source, out_dir if written.is_dir() else written.parent)
    return written


__all__ = ["FORMATS", "ExportError", "export"]
