"""Calibration samples the model cannot take, refused before the first forward pass (issue #32, item 3).

Each message names the sample (its index in the calibration set), the limit and the fix. Without these checks the
same inputs fail deep inside torch ("The expanded size of the tensor (119) must match the existing size (64)", a
bare "index out of range in self"), or worse, run on silently changed data (float ids cast, a longer mask cut).

- `sample_tensor`, `check_sample`: one sample on its own (nesting, dtypes, the mask against the ids).
- `check_model_inputs`: the samples against the model (position table, vocabulary, token types, pad id).
- `position_limit`, `position_tables`: the longest sample the model's learned position tables take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Sample = dict[str, torch.Tensor]
Indexed = list[tuple[int, Sample]]  # (index in the calibration set, the sample's 1-D tensors)

_ONE_SAMPLE = (
    "Each item of the calibration set is one sample: a dict whose input_ids is one list of token ids, "
    "e.g. {'input_ids': [101, 7592, 102]}."
)


def sample_tensor(value: Any, index: int, key: str) -> torch.Tensor:
    """`key` of calibration sample `index` as a 1-D int64 tensor. A sample wrapped once ([[ids]], as
    `return_tensors="pt"` gives one) is unwrapped; deeper nesting, several sequences and non-integer ids are
    refused rather than guessed at (a float id cast to int would silently become another token)."""
    where = f"Calibration sample {index}'s {key}"
    if isinstance(value, (str, bytes)) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        raise ValueError(f"{where} holds text ({value!r:.60}), not token ids: tokenize the samples first.")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{where} cannot be read as one sequence of token ids ({err}): sequences of different lengths "
            f"nested in one sample are a batch, not a sample. {_ONE_SAMPLE}"
        ) from err
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ValueError(_nesting_message(where, tensor))
    if key == "attention_mask":
        if tensor.numel() and not ((tensor == 0) | (tensor == 1)).all():
            bad = tensor[(tensor != 0) & (tensor != 1)][0].item()
            raise ValueError(f"{where} holds {bad}: a mask holds only 0 and 1.")
    elif tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        raise ValueError(_not_integer_message(where, tensor))
    return tensor.long()


def _nesting_message(where: str, tensor: torch.Tensor) -> str:
    shape = tuple(tensor.shape)
    if tensor.dim() == 0:
        return f"{where} is a single number ({tensor.item()}), not a sequence. {_ONE_SAMPLE}"
    if tensor.dim() == 2:
        return (
            f"{where} holds {shape[0]} sequences (shape {shape}): a batch was given where one sample is expected. "
            "Split it into one item per sequence, e.g. `[{'input_ids': ids} for ids in batch['input_ids']]`, "
            "or tokenize a `datasets.Dataset` with `ds.map(..., batched=True)` (one sample per row)."
        )
    return f"{where} is nested {tensor.dim()} lists deep (shape {shape}). {_ONE_SAMPLE}"


def _not_integer_message(where: str, tensor: torch.Tensor) -> str:
    fractional = tensor[tensor != tensor.round()] if tensor.dtype.is_floating_point else tensor[:0]
    example = f", e.g. {fractional[0].item()}" if fractional.numel() else f", e.g. {tensor[0].item()}"
    return (
        f"{where} holds {str(tensor.dtype).removeprefix('torch.')} values{example}: token ids must be integers, and "
        "hf_qlimit does not cast them (a cast would turn 3.5 into token 3). Pass the tokenizer's integer ids; a float "
        "column usually comes from a table with missing values or a cast to float on the way."
    )


def check_sample(index: int, sample: Sample) -> None:
    """The mask (and token types) are as long as the ids; the mask is ones then zeros (right padding, which is
    cut off: hf_qlimit pads); the sample has a token."""
    ids = sample["input_ids"]
    for key in ("attention_mask", "token_type_ids"):
        if key in sample and len(sample[key]) != len(ids):
            raise ValueError(
                f"Calibration sample {index} has {len(ids)} input_ids but {len(sample[key])} {key} values: they "
                f"must be the same length. Give each sample the {key} its tokenizer returned with its ids (both "
                "unpadded, or both padded the same way), or leave the column out."
            )
    mask = sample["attention_mask"]
    if (rises := (mask[1:] > mask[:-1]).nonzero()).numel():
        zero = int(rises[0])
        raise ValueError(
            f"Calibration sample {index}'s attention_mask is not ones followed by zeros (a 0 at position {zero}, then "
            "a 1): left padding or holes are not supported. Pass the samples unpadded "
            "(tokenize with padding=False); hf_qlimit pads them itself."
        )
    if not mask.any():
        raise ValueError(f"Calibration sample {index} has no tokens; drop empty samples before calibrating.")


def check_model_inputs(model: nn.Module, samples: Indexed, max_length: int | None, pad_token_id: int | None) -> None:
    """Refuses samples (as fed: truncated to `max_length`, unpadded) that `model` cannot take."""
    _check_positions(model, samples, max_length)
    _check_vocabulary(model, samples, pad_token_id)
    _check_token_types(model, samples)


def _first_bad(samples: Indexed, is_bad: Callable[[Sample], bool]) -> tuple[int, Sample, int] | None:
    """The first sample `is_bad` holds for: (its index, the sample, how many others are bad too)."""
    bad = [(index, sample) for index, sample in samples if is_bad(sample)]
    return (*bad[0], len(bad) - 1) if bad else None


def _others(count: int, singular: str, plural: str) -> str:
    """' 2 more samples are too long.': the other samples with the same problem, as a sentence."""
    return f" {count} more sample{'s' if count > 1 else ''} {singular if count == 1 else plural}." if count else ""


@dataclass(frozen=True)
class PositionTable:
    """A learned position table: `rows` embeddings, position 0 at row `offset`."""

    name: str
    rows: int
    offset: int  # OPT/BART: a learned offset (2); RoBERTa-style: padding_idx + 1
    from_padding: bool  # the offset is RoBERTa's: positions count from pad_token_id + 1

    @property
    def limit(self) -> int:
        """The most tokens a sample can have."""
        return self.rows - self.offset


def position_tables(model: nn.Module) -> list[PositionTable]:
    """The model's learned absolute position tables. Rotary, ALiBi and relative positions (T5, DeBERTa) have none:
    nothing refuses long samples there."""
    words = _input_embedding(model)
    tables = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2].lower()
        if not isinstance(module, nn.Embedding) or module is words or "relative" in leaf:
            continue
        if "position" in leaf or leaf == "wpe":
            offset = getattr(module, "offset", 0)
            offset = offset if isinstance(offset, int) else 0
            # A position table with a padding row is RoBERTa's: positions are pad_token_id + 1 + (0, 1, ...)
            padding = module.padding_idx is not None
            offset += module.padding_idx + 1 if padding else 0
            tables.append(PositionTable(name, module.num_embeddings, offset, padding))
    return tables


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a calibration sample can have (None: no learned position table)."""
    tables = position_tables(model)
    return min(t.limit for t in tables) if tables else None


def _table_source(model: nn.Module, table: PositionTable) -> str:
    """Where the limit comes from, in the config's words where they match."""
    config = model.config
    field = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
    value = getattr(config, "max_position_embeddings", None)
    if value == table.limit:
        return field
    if table.from_padding and value == table.rows:
        pad = table.offset - 1
        return f"{field}={value}, less pad_token_id + 1 = {table.offset}: positions start after the padding index {pad}"
    return f"{table.name} has {table.rows} rows, the first position at row {table.offset}"


def _check_positions(model: nn.Module, samples: Indexed, max_length: int | None) -> None:
    tables = position_tables(model)
    if not tables:
        return
    table = min(tables, key=lambda t: t.limit)
    limit = table.limit
    found = _first_bad(samples, lambda s: len(s["input_ids"]) > limit)
    if found is None:
        return
    index, sample, others = found
    tokens = len(sample["input_ids"])
    after = f" after truncation to max_length={max_length}" if tokens == max_length else ""
    now = "" if max_length is None else f" (it is {max_length} now)"
    more = _others(others, "is too long", "are too long")
    raise ValueError(
        f"Calibration sample {index} has {tokens} tokens{after}, but {type(model).__name__}'s "
        f"position table holds {limit} ({_table_source(model, table)}).{more} "
        f"Pass max_length={limit} to QLimitConfig{now}, or truncate the samples when tokenizing "
        f"(truncation=True, max_length={limit})."
    )


def _out_of_range(values: torch.Tensor, rows: int) -> torch.Tensor:
    return (values < 0) | (values >= rows)


def _check_vocabulary(model: nn.Module, samples: Indexed, pad_token_id: int | None) -> None:
    rows = getattr(_input_embedding(model), "num_embeddings", None)
    if rows is None:
        return
    name = type(model).__name__
    source = "vocab_size" if getattr(model.config, "vocab_size", None) == rows else f"{rows} rows"
    found = _first_bad(samples, lambda s: bool(_out_of_range(s["input_ids"], rows).any()))
    if found is not None:
        index, sample, others = found
        ids = sample["input_ids"]
        position = int(_out_of_range(ids, rows).nonzero()[0])
        value = int(ids[position])
        why = (
            "Negative ids are usually padding or a label's ignore value (-100): pass the samples unpadded, "
            "hf_qlimit pads them."
            if value < 0
            else "Tokenize with this model's own tokenizer: ids past the vocabulary usually come from another's."
        )
        more = _others(others, "has such ids", "have such ids")
        raise ValueError(
            f"Calibration sample {index} has token id {value} at position {position}, but {name}'s input embedding "
            f"holds {rows} ids ({source}): ids must be 0 to {rows - 1}.{more} {why}"
        )
    pad = pad_token_id or 0  # what prepare_calibration pads with, where samples differ in length
    if len({len(s["input_ids"]) for _, s in samples}) > 1 and not 0 <= pad < rows:
        raise ValueError(
            f"{name}'s config has pad_token_id={pad_token_id}, outside its {rows} token ids, and hf_qlimit pads "
            f"the calibration samples with it. Set model.config.pad_token_id to an id below {rows} (the "
            "tokenizer's pad_token_id)."
        )


def _forward_takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: let the forward decide
        return True


def _token_type_rows(model: nn.Module) -> tuple[int, str] | None:
    """How many token types the model has an embedding for, and where that number comes from."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "token_type" in name.rpartition(".")[2]:
            same = getattr(model.config, "type_vocab_size", None) == module.num_embeddings
            return module.num_embeddings, "type_vocab_size" if same else f"{name} has {module.num_embeddings} rows"
    types = getattr(model.config, "type_vocab_size", None)
    if isinstance(types, int) and types > 0:
        return types, "type_vocab_size"
    # No table: GPT-2 adds rows of its word embedding for them; DeBERTa-v3 (type_vocab_size 0) ignores the
    # token_type_ids its own tokenizer returns. Either way the word embedding bounds them.
    rows = getattr(_input_embedding(model), "num_embeddings", None)
    return None if rows is None else (rows, "they index its input embedding")


def _check_token_types(model: nn.Module, samples: Indexed) -> None:
    given = [(index, s) for index, s in samples if "token_type_ids" in s]
    if not given:
        return
    name = type(model).__name__
    if not _forward_takes(model, "token_type_ids"):
        raise ValueError(
            f"Calibration sample {given[0][0]} has token_type_ids, but {name} has no token type embedding (its "
            "forward takes no token_type_ids). Drop the column: `ds.remove_columns('token_type_ids')`, or tokenize "
            "with return_token_type_ids=False."
        )
    bound = _token_type_rows(model)
    if bound is None:
        return
    rows, source = bound
    found = _first_bad(given, lambda s: bool(_out_of_range(s["token_type_ids"], rows).any()))
    if found is None:
        return
    index, sample, others = found
    types = sample["token_type_ids"]
    position = int(_out_of_range(types, rows).nonzero()[0])
    allowed = "0" if rows == 1 else f"0 to {rows - 1}"
    more = _others(others, "has such types", "have such types")
    raise ValueError(
        f"Calibration sample {index} has token type {int(types[position])} at position {position}, but {name} has "
        f"an embedding for {rows} token type{'s' if rows > 1 else ''} ({source}): token_type_ids must be "
        f"{allowed}.{more} Tokenize with this model's own tokenizer, or drop the "
        "token_type_ids column."
    )


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding, None for a class that does not say (not a transformers model)."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
