"""What the command line and the example scripts use: the argument dataclasses that map flags onto
`QLimitConfig`, and the GGUF -> float32 transformers importer (`python -m hf_qlimit.cli.gguf_to_hf`).

Kept in the package (not under examples/) because an installed command needs them too."""

from .arguments import QuantizationArguments

__all__ = ["QuantizationArguments"]
