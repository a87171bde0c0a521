"""Entry points: `hf_qlimit.quantize(model, calib_ds, config)` and `PreTrainedModel.quantize_qlimit`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import QLimitConfig


def quantize(model: nn.Module, calib_ds: Any, config: QLimitConfig | None = None) -> nn.Module:
    """Quantizes a transformers model in place with Q-Limit PTQ and returns it.

    Args:
        model: a `PreTrainedModel` in full precision (float32 is safest).
        calib_ds: a `datasets.Dataset`, or any iterable of dicts, of tokenized and unpadded model inputs
            (`input_ids`, optionally `attention_mask` and `token_type_ids`); other columns are ignored.
        config: a `QLimitConfig`; the default is W4A8 QDrop with the fast preset.

    After this, `model.save_pretrained(path)` writes packed integer weights, and
    `AutoModel*.from_pretrained(path)` (after `import hf_qlimit`) rebuilds the same model.
    """
    from .pipeline import quantize_model

    return quantize_model(model, calib_ds, config if config is not None else QLimitConfig())


def _quantize_qlimit(self, calib_ds: Any, config: QLimitConfig | None = None):
    return quantize(self, calib_ds, config)


_quantize_qlimit.__doc__ = quantize.__doc__


def patch_pretrained_model() -> None:
    from transformers import PreTrainedModel

    PreTrainedModel.quantize_qlimit = _quantize_qlimit
