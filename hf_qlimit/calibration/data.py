"""Calibration data: a dataset of tokenized, unpadded samples -> padded tensors."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .checks import check_model_inputs, check_sample, sample_tensor

logger = logging.get_logger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _take(calib_ds: Any, num_samples: int, seed: int) -> list[tuple[int, Any]]:
    """Up to `num_samples` samples, each with its index in `calib_ds` (what error messages name)."""
    if isinstance(calib_ds, (str, bytes)) or not isinstance(calib_ds, Iterable):
        raise TypeError(
            f"The calibration set must be a `datasets.Dataset` or an iterable of dicts of tokenized model inputs, "
            f"got {type(calib_ds).__name__}. Tokenize your texts first, "
            "e.g. `ds.map(lambda b: tok(b['text']), batched=True)`."
        )
    if isinstance(calib_ds, Mapping) and "input_ids" in calib_ds:  # tokenizer(texts): columns, not samples
        raise ValueError(
            "The calibration set is one batch (a dict of columns, as `tokenizer(texts)` returns), where a set of "
            "samples is expected: pass `datasets.Dataset.from_dict(dict(encodings))`, or a list with one dict per "
            "sample, e.g. `[{'input_ids': ids} for ids in encodings['input_ids']]`."
        )
    if hasattr(calib_ds, "__len__") and hasattr(calib_ds, "select"):  # datasets.Dataset: draw a seeded subset
        n = len(calib_ds)
        indices = sorted(random.Random(seed).sample(range(n), num_samples)) if n > num_samples else range(n)
        return [(i, calib_ds[i]) for i in indices]
    samples = []
    for index, sample in enumerate(calib_ds):
        if len(samples) == num_samples:
            break
        samples.append((index, sample))
    return samples


def _sequence(index: int, sample: Any, types: bool, max_length: int | None) -> dict[str, torch.Tensor]:
    """Sample `index` as 1-D tensors, checked on its own and truncated to its tokens (at most `max_length`).
    `types`: whether the first sample has token_type_ids (all samples must agree; a mask is optional)."""
    if not isinstance(sample, Mapping) or "input_ids" not in sample or ("token_type_ids" in sample) != types:
        found = list(sample.keys()) if isinstance(sample, Mapping) else type(sample).__name__
        raise ValueError(
            f"Calibration sample {index} has the columns {found}, but the first sample has "
            f"{'input_ids and token_type_ids' if types else 'input_ids without token_type_ids'}: every sample needs "
            "input_ids, and token_type_ids in all samples or none."
        )
    seq = {k: sample_tensor(sample[k], index, k) for k in MODEL_INPUTS if k in sample}
    if "attention_mask" not in seq:
        seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    check_sample(index, seq)
    tokens = int(seq["attention_mask"].sum())
    length = tokens if max_length is None else min(tokens, max_length)
    return {k: v[:length] for k, v in seq.items()}


def prepare_calibration(
    calib_ds: Any,
    num_samples: int,
    max_length: int | None,
    pad_token_id: int | None,
    seed: int = 0,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Draws up to `num_samples` samples and right-pads them to one length.

    Returns `input_ids`, `attention_mask` (and `token_type_ids` when given), each of shape (samples, length).
    With `model`, samples it cannot take (too long for its position table, ids past its vocabulary...) are refused
    first, naming the sample (calibration/checks.py).
    """
    samples = _take(calib_ds, num_samples, seed)
    if not samples:
        raise ValueError(
            "The calibration set is empty: pass at least one tokenized sample (a few hundred are typical)."
        )
    first = samples[0][1]
    if not isinstance(first, Mapping) or "input_ids" not in first:
        found = list(first.keys()) if isinstance(first, Mapping) else type(first).__name__
        raise ValueError(
            f"Calibration samples need an `input_ids` column of token ids; found {found}. Tokenize the texts first "
            "(without padding; hf_qlimit pads), e.g. `ds.map(lambda b: tokenizer(b['sentence']), batched=True)`."
        )
    if len(samples) < num_samples:
        logger.warning(f"The calibration set has {len(samples)} samples, fewer than num_samples={num_samples}.")
    types = "token_type_ids" in first
    seqs = [(index, _sequence(index, sample, types, max_length)) for index, sample in samples]
    if model is not None:  # before any forward pass: torch's own errors would not say which sample or why
        check_model_inputs(model, seqs, max_length, pad_token_id)
    width = max(len(s["input_ids"]) for _, s in seqs)
    pad_values = {"input_ids": pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    batch = {}
    for key in seqs[0][1]:
        out = torch.full((len(seqs), width), pad_values[key], dtype=torch.long)
        for i, (_, s) in enumerate(seqs):
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
