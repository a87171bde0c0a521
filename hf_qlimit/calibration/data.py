"""Calibration data: a dataset of tokenized, unpadded samples -> padded tensors."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _take(calib_ds: Any, num_samples: int, seed: int) -> list[Mapping]:
    if isinstance(calib_ds, (str, bytes)) or not isinstance(calib_ds, Iterable):
        raise TypeError(
            f"The calibration set must be a `datasets.Dataset` or an iterable of dicts of tokenized model inputs, "
            f"got {type(calib_ds).__name__}. Tokenize your texts first, "
            "e.g. `ds.map(lambda b: tok(b['text']), batched=True)`."
        )
    if hasattr(calib_ds, "__len__") and hasattr(calib_ds, "select"):  # datasets.Dataset: draw a seeded subset
        n = len(calib_ds)
        indices = sorted(random.Random(seed).sample(range(n), num_samples)) if n > num_samples else range(n)
        return [calib_ds[i] for i in indices]
    samples = []
    for sample in calib_ds:
        if len(samples) == num_samples:
            break
        samples.append(sample)
    return samples


def _ids(value: Any) -> torch.Tensor:
    ids = torch.as_tensor(value)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(
            f"Each calibration sample must hold one unpadded sequence; got a tensor of shape {tuple(ids.shape)}."
        )
    return ids.long()


def prepare_calibration(
    calib_ds: Any, num_samples: int, max_length: int | None, pad_token_id: int | None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Draws up to `num_samples` samples and right-pads them to one length.

    Returns `input_ids`, `attention_mask` (and `token_type_ids` when given), each of shape (samples, length).
    """
    samples = _take(calib_ds, num_samples, seed)
    if not samples:
        raise ValueError(
            "The calibration set is empty: pass at least one tokenized sample (a few hundred are typical)."
        )
    first = samples[0]
    if not isinstance(first, Mapping) or "input_ids" not in first:
        found = list(first.keys()) if isinstance(first, Mapping) else type(first).__name__
        raise ValueError(
            f"Calibration samples need an `input_ids` column of token ids; found {found}. Tokenize the texts first "
            "(without padding; hf_qlimit pads), e.g. `ds.map(lambda b: tokenizer(b['sentence']), batched=True)`."
        )
    if len(samples) < num_samples:
        logger.warning(f"The calibration set has {len(samples)} samples, fewer than num_samples={num_samples}.")
    keys = [k for k in MODEL_INPUTS if k in first]
    seqs = []
    for sample in samples:
        seq = {k: _ids(sample[k]) for k in keys}
        if "attention_mask" not in seq:
            seq["attention_mask"] = torch.ones_like(seq["input_ids"])
        tokens = int(seq["attention_mask"].sum())
        length = tokens if max_length is None else min(tokens, max_length)
        if length == 0:
            raise ValueError("A calibration sample has no tokens; drop empty samples before calibrating.")
        seqs.append({k: v[:length] for k, v in seq.items()})
    width = max(len(s["input_ids"]) for s in seqs)
    pad_values = {"input_ids": pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    batch = {}
    for key in seqs[0]:
        out = torch.full((len(seqs), width), pad_values[key], dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s[key])] = s[key]
        batch[key] = out
    return batch


def length_sorted_batches(data: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of samples of similar length, each trimmed to its longest sample."""
    lengths = data["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = int(lengths[index].max())
        batches.append({k: v[index, :width] for k, v in data.items()})
    return batches
