"""Sizes `hf-qlimit quantize` reports: the source model's weights, the saved folder, the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (or of `path`, a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _weight_files_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def source_size(name: str, model: nn.Module) -> tuple[int, str]:
    """(bytes, basis) of the source model: its weight files (a local folder, or the Hub download in the local
    cache), else its parameters and buffers as loaded."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))  # what from_pretrained just downloaded
        except (OSError, ValueError):  # no cache entry (another revision, a custom cache_dir): fall back on the tensors
            folder = None
    if folder is not None:
        total = _weight_files_bytes(folder)
        if total:
            return total, "weight files"
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors), "tensors as loaded"


def gguf_has_tokenizer(path: Path) -> bool | None:
    """Whether a GGUF file carries llama.cpp's tokenizer keys (None when the `gguf` package is missing)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    return "tokenizer.ggml.model" in GGUFReader(str(path)).fields


def export_info(format: str, written: Path) -> dict[str, Any]:
    """The summary's "export" entry: format, path, bytes (and for GGUF whether llama.cpp finds a tokenizer)."""
    info: dict[str, Any] = {"format": format, "path": str(written), "bytes": folder_bytes(written)}
    if format == "gguf":
        info["has_tokenizer"] = gguf_has_tokenizer(written)
    return info
