"""Entry points: `hf_qlimit.quantize(model, calib_ds, config)` and `PreTrainedModel.quantize_qlimit`."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .config import QLimitConfig


def quantize(
    model: nn.Module,
    calib_ds: Any,
    config: QLimitConfig | None = None,
    *,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    cache_budget_bytes: int | None = None,
) -> nn.Module:
    """Quantizes a transformers model in place with Q-Limit PTQ and returns it.

    Args:
        model: a `PreTrainedModel` in full precision (float32 is safest).
        calib_ds: a `datasets.Dataset`, or any iterable of dicts, of tokenized and unpadded model inputs
            (`input_ids`, optionally `attention_mask` and `token_type_ids`); other columns are ignored.
        config: a `QLimitConfig`; the default is `QLimitConfig()`: W4A8, method and preset "auto", which
            `config.for_model(model)` shows resolved for this model.
        device: where the computation runs. Default: the model's device, or CUDA if available (else CPU) for a
            model dispatched by accelerate (`device_map=...` with CPU or disk offload). Blocks are brought to it
            one at a time; a dispatched model ends up on CPU, quantized.
        work_dir: a folder where the progress is written after every block, and where calibration caches
            spill past `cache_budget_bytes`.
        resume: carry on from the progress in `work_dir` (same model, settings and calibration data); the
            result is the same as an uninterrupted run.
        cache_budget_bytes: CPU memory allowed for the calibration caches (the FP and quantized block inputs
            and targets); beyond it they go to memory-mapped files in `work_dir`. Default: no limit.

    After this, `model.save_pretrained(path)` writes packed integer weights, and
    `AutoModel*.from_pretrained(path)` (after `import hf_qlimit`) rebuilds the same model.
    """
    from .calibration.pipeline import quantize_model

    return quantize_model(
        model,
        calib_ds,
        config if config is not None else QLimitConfig(),
        device=device,
        work_dir=work_dir,
        resume=resume,
        cache_budget_bytes=cache_budget_bytes,
    )


def _quantize_qlimit(self, calib_ds: Any, config: QLimitConfig | None = None, **kwargs: Any):
    return quantize(self, calib_ds, config, **kwargs)


_quantize_qlimit.__doc__ = quantize.__doc__


def patch_pretrained_model() -> None:
    from transformers import PreTrainedModel

    PreTrainedModel.quantize_qlimit = _quantize_qlimit
