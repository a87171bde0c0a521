"""Where and how one quantization runs: the execution device, offload, activation caches and resume state.

The pipeline holds one `Run` and goes through it to bring modules to the execution device, convert them, and
park finished blocks where the model lives (back to disk for an offloaded model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QLimitConfig
from ..hf.surgery import convert_model, quantized_modules
from ..nn.modules import set_inference_mode
from .cache import ActivationCache
from .offload import Offloader, release_memory
from .resume import WorkDir, fingerprint


@dataclass
class Run:
    """Where and how this quantization runs: execution device, offload, caches, resume state."""

    device: torch.device
    offloader: Offloader
    cache: ActivationCache
    work: WorkDir | None
    home: torch.device | None  # where an undispatched model lives, and goes back to; None: offloaded (-> CPU)
    token_mask: list[torch.Tensor]
    done: int = 0  # blocks finished by an interrupted run
    parked_dir: Path | None = None  # finished offloaded blocks' files when there is no work folder

    @classmethod
    def open(
        cls,
        model: nn.Module,
        config: QLimitConfig,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        dispatched: bool,
        work_dir: str | os.PathLike | None,
        resume: bool,
        cache_budget_bytes: int | None,
    ) -> Run:
        """A run of `model` on `device`; with `work_dir`, it carries on from an interrupted one if `resume`."""
        offloader = Offloader(model, device)
        cache = ActivationCache(cache_budget_bytes, work_dir)
        work = WorkDir(work_dir, fingerprint(config.to_dict(), batches, model)) if work_dir is not None else None
        done = work.done_blocks() if work is not None else 0
        if done and not resume:
            raise ValueError(
                f"{work_dir} holds {done} finished blocks of this same quantization: pass resume=True to carry "
                "on from there, or use an empty work_dir to start over."
            )
        home = None if dispatched else next(model.parameters()).device
        return cls(device, offloader, cache, work, home, [b["attention_mask"].bool() for b in batches], done)

    @property
    def parking(self) -> torch.device:
        """Where finished blocks wait: the model's own device, or CPU for an offloaded model."""
        return self.home or torch.device("cpu")

    def release_memory(self) -> None:
        """After freeing a large module: an offloaded run returns the memory to the OS (see offload.py)."""
        if self.home is None:
            release_memory()

    def convert(self, model: nn.Module, names: list[str], config: QLimitConfig, frozen: bool) -> list[nn.Module]:
        """Materializes the modules `names` on the execution device and swaps them for quantized ones."""
        for name in names:
            self.offloader.materialize(name)
        convert_model(model, {n: config.layer_config[n] for n in names}, config, frozen=frozen)
        modules = [model.get_submodule(n) for n in names]
        for module in modules:  # attention quantizers hold no weight; an experts module one per 3-D weight
            for _, quantized in quantized_modules(module):
                set_inference_mode(quantized, "dequantize")  # memory stays bounded by one block; restored at the end
                if not frozen:
                    quantized.weight_quantizer.init_range(quantized.weight, config.weight_range_p)
        return modules

    def park(self, name: str, saved: Path | None) -> None:
        """A finished block leaves the execution device when the model lives elsewhere: back to disk if it came
        from there (into `saved`, its state in the work folder, when there is one), else to CPU or the model's
        home."""
        if self.offloader.was_offloaded(name):
            if saved is None:
                self.offloader.park(name, self._parked_files() / f"{name}.safetensors")
            else:
                self.offloader.park(name, saved, write=False)
        else:
            self.offloader.model.get_submodule(name).to(self.parking)
        self.release_memory()

    def _parked_files(self) -> Path:
        """The folder of parked blocks' files, made on first use; removed with the model that reads them."""
        if self.parked_dir is None:
            self.parked_dir = Path(tempfile.mkdtemp(prefix="qlimit_parked_"))
            weakref.finalize(self.offloader.model, shutil.rmtree, self.parked_dir, ignore_errors=True)
        return self.parked_dir

    @contextmanager
    def blocks_visiting(self, blocks: nn.ModuleList) -> Iterator[None]:
        """Whole-model passes with parked blocks: each block visits the execution device for its own forward."""
        if self.parking == self.device:
            yield
            return

        blocks = [b for b in blocks if getattr(b, "_hf_hook", None) is None]  # parked on disk: their hooks do this

        def visit(block: nn.Module, args: Any) -> None:
            block.to(self.device)

        def leave(block: nn.Module, args: Any, out: Any) -> None:
            block.to(self.parking)  # no memory release here: this runs for every block of every batch

        handles = []
        for block in blocks:
            handles.append(block.register_forward_pre_hook(visit))
            handles.append(block.register_forward_hook(leave))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
