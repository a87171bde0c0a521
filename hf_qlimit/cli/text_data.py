"""Text for `hf-qlimit quantize`: calibration windows and a held-out perplexity slice from a text file or a dataset.

A text is read the way examples/language-modeling/run_ppl.py reads WikiText (GPTQ's protocol): its lines joined
with "\\n\\n", tokenized once, cut into non-overlapping windows of `seq_len` tokens. Calibration takes the first
windows; the perplexity slice is the windows right after them (never seen by calibration), or those of `--eval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Suffixes that mark a text file, not a dataset name: a missing `notes.txt` is a typo, not a Hub dataset.
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
# Characters read per token needed before tokenizing: generous (English BPE is ~4), so that a large dataset is
# not tokenized whole; when it falls short, everything is read.
CHARS_PER_TOKEN = 12


class UsageError(ValueError):
    """Bad input found before any work: the command prints it and exits with status 2."""


@dataclass
class TextSource:
    """Where a text comes from: a local text file, a local dataset (folder or file) or a Hub dataset name."""

    name: str
    config: str | None = None
    split: str = "train"
    column: str = "text"

    @property
    def kind(self) -> str:
        path = Path(self.name).expanduser()
        if path.is_file():
            return "dataset" if path.suffix in DATA_SUFFIXES else "file"
        if path.is_dir():
            return "dataset"
        looks_local = self.name.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES + DATA_SUFFIXES
        if looks_local:
            raise UsageError(f"No such file or folder: {self.name!r}. Pass an existing text file, dataset or name.")
        return "hub"

    def describe(self) -> str:
        if self.kind == "file":
            return self.name
        return f"{self.name}" + (f"/{self.config}" if self.config else "") + f":{self.split}[{self.column}]"


def read_text_file(path: str | Path) -> list[str]:
    """The lines of a text file as the Hub's wikitext builder yields them: newline kept, blank lines as ""."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def read_dataset(source: TextSource) -> list[str]:
    """The `column` of a dataset: saved with `save_to_disk`, a data file or folder `load_dataset` reads, or a
    Hub name. Raises `UsageError` saying what to pass when it cannot be read."""
    import datasets

    path = Path(source.name).expanduser()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds
        elif path.is_file():
            ds = datasets.load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path))
            ds = ds[source.split] if source.split in ds else ds[next(iter(ds))]
        else:
            ds = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as err:  # noqa: BLE001  (datasets raises many kinds (missing file, no network, bad split, ...))
        raise UsageError(
            f"Could not load the dataset {source.describe()!r} ({type(err).__name__}: {err}). Pass a text file, a "
            "folder saved with save_to_disk, or a dataset name (with --calib_config / --calib_split)."
        ) from None
    if source.column not in ds.column_names:
        raise UsageError(
            f"The dataset {source.name!r} has no column {source.column!r}; --text_column is one of {ds.column_names}."
        )
    return [text or "" for text in ds[source.column]]


def read_texts(source: TextSource) -> list[str]:
    return read_text_file(source.name) if source.kind == "file" else read_dataset(source)


def tokenize(tokenizer: Any, texts: list[str], needed_tokens: int) -> torch.Tensor:
    """The texts joined with "\\n\\n" and tokenized once (1-D ids), reading only about enough texts for
    `needed_tokens` tokens first and everything when that falls short."""
    budget, taken = needed_tokens * CHARS_PER_TOKEN, 0
    for count, text in enumerate(texts, 1):
        taken += len(text) + 2
        if taken >= budget:
            ids = _encode(tokenizer, texts[:count])
            if ids.numel() >= needed_tokens:
                return ids
            break
    return _encode(tokenizer, texts)


def _encode(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False).input_ids[0]


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows; the tail shorter than a window is dropped."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@dataclass
class TextWindows:
    """The calibration samples and the evaluation windows of a run, and where they came from."""

    calib: list[dict[str, torch.Tensor]]
    eval: torch.Tensor  # (n, seq_len); n may be 0 (no perplexity)
    seq_len: int
    calib_source: str
    eval_source: str

    def describe(self) -> dict[str, Any]:
        return {
            "calib": self.calib_source,
            "calib_windows": len(self.calib),
            "eval": self.eval_source,
            "eval_windows": int(self.eval.shape[0]),
            "seq_len": self.seq_len,
        }


def build_windows(
    tokenizer: Any, calib: TextSource, eval_source: TextSource | None, seq_len: int, num_calib: int, num_eval: int
) -> TextWindows:
    """`num_calib` calibration windows, then `num_eval` evaluation windows: from `eval_source` when given, else
    the windows that follow the calibration ones in the same text. Raises `UsageError` when a text is too short."""
    held_out = eval_source is None
    needed = (num_calib + (num_eval if held_out else 0)) * seq_len
    calib_windows = windows(tokenize(tokenizer, read_texts(calib), needed), seq_len)
    if calib_windows.shape[0] * seq_len < needed:
        extra = f" + {num_eval} held-out evaluation" if held_out and num_eval else ""
        raise UsageError(
            f"{calib.describe()} gives {calib_windows.shape[0]} windows of {seq_len} tokens; {num_calib} calibration"
            f"{extra} windows need more. Pass a longer text, fewer --num_samples"
            + (", fewer --eval_windows, --eval FILE" if extra else "")
            + " or a shorter --seq_len."
        )
    calib_samples = [{"input_ids": w.clone()} for w in calib_windows[:num_calib]]
    if held_out:
        evaluation = calib_windows[num_calib : num_calib + num_eval]
        eval_name = f"{calib.describe()}, the {num_eval} windows after the calibration ones"
    else:
        eval_ids = tokenize(tokenizer, read_texts(eval_source), num_eval * seq_len)
        evaluation = windows(eval_ids, seq_len)[:num_eval]
        if num_eval and evaluation.shape[0] == 0:
            raise UsageError(f"--eval {eval_source.name!r} has fewer than {seq_len} tokens: pass a longer text.")
        eval_name = eval_source.describe()
    return TextWindows(calib_samples, evaluation.clone(), seq_len, calib.describe(), eval_name)


@torch.no_grad()
def perplexity(
    model: Any, eval_windows: torch.Tensor, device: torch.device, desc: str, batch_size: int = 1
) -> dict[str, float]:
    """exp(mean NLL) over every predicted token of every window (each predicts seq_len - 1 tokens), `batch_size`
    windows per forward pass."""
    model.eval()
    nll, count = 0.0, 0
    for batch in tqdm(eval_windows.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        labels = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        count += labels.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": int(eval_windows.shape[0])}
