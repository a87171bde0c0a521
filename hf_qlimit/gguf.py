"""Deprecated alias of `hf_qlimit.cli.gguf_to_hf` (GGUF file -> float32 transformers folder), kept for one
release: `python -m hf_qlimit.gguf` still works and warns."""

import warnings

from .cli.gguf_to_hf import convert_gguf_to_hf, load_gguf_as_float, main, smollm2_path

warnings.warn(
    "hf_qlimit.gguf moved to hf_qlimit.cli.gguf_to_hf (`python -m hf_qlimit.cli.gguf_to_hf`); the old name goes in "
    "the next release.",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["convert_gguf_to_hf", "load_gguf_as_float", "main", "smollm2_path"]

if __name__ == "__main__":
    main()
