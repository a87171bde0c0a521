"""Calibration caches (the FP and quantized streams, targets, Fisher weights) kept in CPU memory up to a budget.

A stream is a list with one tensor per calibration batch. Past the budget, new tensors go to files in a
folder and are read back memory-mapped when used, so the process holds them only while a batch is in use.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch


class ActivationCache:
    """Hands out streams that share one RAM budget (`None`: unlimited) and spill to `folder` beyond it."""

    def __init__(self, budget_bytes: int | None = None, folder: str | os.PathLike | None = None) -> None:
        if budget_bytes is not None and folder is None:
            raise ValueError("cache_budget_bytes needs a folder to spill to: pass work_dir as well.")
        self.budget = budget_bytes
        self.folder = Path(folder) / "cache" if folder is not None else None
        self.used = 0
        self.spilled = 0  # tensors written to disk so far, for logs and tests
        self._ids = itertools.count()

    def stream(self, tensors=()) -> Stream:
        out = Stream(self)
        for t in tensors:
            out.append(t)
        return out

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor | Path:
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self.used + size <= self.budget:
            self.used += size
            return tensor
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{next(self._ids)}.pt"
        torch.save(tensor.contiguous(), path)
        self.spilled += 1
        return path

    def _forget(self, item: torch.Tensor | Path) -> None:
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
        else:
            self.used -= item.numel() * item.element_size()


class Stream:
    """List-like: `append`, `len`, indexing and iteration give CPU tensors (spilled ones loaded memory-mapped)."""

    def __init__(self, cache: ActivationCache) -> None:
        self._cache, self._items = cache, []

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(self._cache._keep(tensor.detach().cpu()))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, j: int) -> torch.Tensor:
        item = self._items[j]
        return torch.load(item, mmap=True, weights_only=True) if isinstance(item, Path) else item

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def __del__(self) -> None:
        for item in getattr(self, "_items", ()):
            self._cache._forget(item)
