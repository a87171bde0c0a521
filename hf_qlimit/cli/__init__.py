"""What the command line and the example scripts use: the argument dataclasses that map flags onto
`QLimitConfig`, and the GGUF -> float32 transformers importer (`python -m hf_qlimit.cli.gguf_to_hf`).

Kept in the package (not under examples/) so that the examples, the benchmarks and the `hf-qlimit` command
(`main.py`, the console script of pyproject.toml; `quantize.py` is its `quantize` subcommand) share one copy."""

from .arguments import QuantizationArguments

__all__ = ["QuantizationArguments"]
