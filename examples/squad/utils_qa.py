"""Data handling of extractive question answering: SQuAD files, windowed features and span decoding.

* `load_squad_json` / `select_articles`: SQuAD-format json -> one row per question, and a reproducible
  split by article (titles sorted, even or odd positions).
* `prepare_features`: question + context -> model features; long contexts become several overlapping
  windows (`doc_stride` tokens of overlap), each remembering its question and, for evaluation, the
  character span of every context token.
* `postprocess_qa_predictions`: start/end logits of every window -> one answer text per question
  (n-best search inside each window, `max_answer_length`, SQuAD v2 null answers with a threshold).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

# Under "transformers" so that run_qa.py can show these INFO messages with transformers' handler.
logger = logging.get_logger("transformers.examples.squad.utils_qa")

PARITIES = ("all", "even", "odd")


def load_squad_json(path: str) -> Dataset:
    """Flattens a SQuAD v1.1 / v2.0 json file into the columns of the Hub `squad` datasets.

    Columns: id, title, context, question, answers ({"text": [...], "answer_start": [...]}) and
    is_impossible. Unanswerable v2 questions get empty answer lists.
    """
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    rows: dict[str, list[Any]] = {k: [] for k in ("id", "title", "context", "question", "answers", "is_impossible")}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else qa.get("answers", [])
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append(
                    {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
                )
                rows["is_impossible"].append(impossible)
    return Dataset.from_dict(rows)


def select_articles(dataset: Dataset, parity: str) -> Dataset:
    """Keeps the questions of the articles at even or odd positions once articles are sorted by title.

    Sorting by title (not file order) makes the split independent of how the file was written; the
    reference model `minilm-l6-squad` was fine-tuned on the even positions of SQuAD v1.1 dev.
    """
    if parity not in PARITIES:
        raise ValueError(f"`article_parity` must be one of {PARITIES}, got {parity!r}.")
    if parity == "all":
        return dataset
    titles = sorted(set(dataset["title"]))
    wanted = {title for position, title in enumerate(titles) if position % 2 == (0 if parity == "even" else 1)}
    selected = dataset.filter(lambda batch: [t in wanted for t in batch["title"]], batched=True)
    logger.info(f"Article parity {parity}: {len(wanted)}/{len(titles)} articles, {len(selected)} questions.")
    return selected


def prepare_features(
    examples: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
    for_eval: bool,
) -> dict[str, list[Any]]:
    """Tokenizes a batch of questions with their contexts into (possibly several) unpadded windows.

    With `for_eval`, every window also gets `example_id` (its question) and `offset_mapping`, the
    character span of each token in the context, or None for tokens outside the context so that
    post-processing never answers with part of the question or a special token.
    """
    pad_on_right = tokenizer.padding_side == "right"
    # Some questions start with lots of whitespace, which only wastes room in the window.
    questions = [q.lstrip() for q in examples["question"]]
    first, second = (questions, examples["context"]) if pad_on_right else (examples["context"], questions)
    encoded = tokenizer(
        first,
        second,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=for_eval,
        padding=False,
    )
    sample_map = encoded.pop("overflow_to_sample_mapping")
    if not for_eval:
        return dict(encoded)
    context_index = 1 if pad_on_right else 0
    encoded["example_id"] = []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        encoded["example_id"].append(examples["id"][sample_map[i]])
        encoded["offset_mapping"][i] = [
            tuple(o) if sequence_ids[k] == context_index else None for k, o in enumerate(offsets)
        ]
    return dict(encoded)


def _top_indices(logits: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(logits)[::-1][:n]


def postprocess_qa_predictions(
    examples: Dataset | Sequence[dict[str, Any]],
    features: Dataset | Sequence[dict[str, Any]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Turns per-window start/end logits into one answer text per question.

    Args:
        examples: questions with "id" and "context".
        features: windows with "example_id" and "offset_mapping" (None outside the context), as made by
            `prepare_features(..., for_eval=True)`.
        start_logits, end_logits: one 1-D array per feature (any length up to the feature's length).
        version_2_with_negative: allow the null answer (the [CLS] token, index 0) and predict "" when
            null score - best span score > `null_score_diff_threshold`.
        n_best_size: start and end candidates tried per window, and size of the returned n-best lists.
        max_answer_length: longest answer, in tokens.

    Returns:
        (predictions id -> text, n-best lists id -> [{"text", "score", "start_logit", "end_logit",
        "probability"}], null-score differences id -> float (v2 only, else empty)).
    """
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)}/{len(end_logits)} start/end logits.")
    # Read the two columns once: row access on a `Dataset` would decode every column of every row.
    if isinstance(features, Dataset):
        example_ids, all_offsets = features["example_id"], features["offset_mapping"]
    else:
        example_ids = [f["example_id"] for f in features]
        all_offsets = [f["offset_mapping"] for f in features]
    windows_of = collections.defaultdict(list)
    for index, example_id in enumerate(example_ids):
        windows_of[example_id].append(index)

    predictions: dict[str, str] = {}
    nbest_json: dict[str, list[dict[str, Any]]] = {}
    null_diffs: dict[str, float] = {}
    for example in examples:
        context = example["context"]
        candidates: list[dict[str, Any]] = []
        null: dict[str, Any] | None = None
        for index in windows_of.get(example["id"], []):
            offsets = all_offsets[index]
            start = np.asarray(start_logits[index], dtype=np.float64)[: len(offsets)]
            end = np.asarray(end_logits[index], dtype=np.float64)[: len(offsets)]
            # The null answer points at [CLS]; over several windows the least confident one counts.
            window_null = float(start[0] + end[0])
            if null is None or window_null < null["score"]:
                null = {"text": "", "score": window_null, "start_logit": float(start[0]), "end_logit": float(end[0])}
            # Spans are only formed inside one window, so an answer never crosses windows.
            for s in _top_indices(start, n_best_size):
                if offsets[s] is None:
                    continue
                for e in _top_indices(end, n_best_size):
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append(
                        {
                            "text": context[offsets[s][0] : offsets[e][1]],
                            "score": float(start[s] + end[e]),
                            "start_logit": float(start[s]),
                            "end_logit": float(end[e]),
                        }
                    )
        candidates.sort(key=lambda c: c["score"], reverse=True)
        answer, nbest, diff = _decide(
            candidates[:n_best_size], null, version_2_with_negative, n_best_size, null_score_diff_threshold
        )
        predictions[example["id"]], nbest_json[example["id"]] = answer, nbest
        if diff is not None:
            null_diffs[example["id"]] = diff
    return predictions, nbest_json, null_diffs


def _decide(
    candidates: list[dict[str, Any]],
    null: dict[str, Any] | None,
    version_2_with_negative: bool,
    n_best_size: int,
    threshold: float,
) -> tuple[str, list[dict[str, Any]], float | None]:
    """Picks the answer of one question from its best spans; returns (answer, n-best list, null diff)."""
    best_span = candidates[0] if candidates else None
    nbest = list(candidates)
    diff = None
    if version_2_with_negative and null is not None:
        # The null answer competes in the n-best list, but the decision uses the score difference.
        nbest = sorted(nbest + [dict(null)], key=lambda c: c["score"], reverse=True)[:n_best_size]
        diff = null["score"] - best_span["score"] if best_span is not None else float("inf")
        answer = "" if diff > threshold else best_span["text"]
    else:
        answer = best_span["text"] if best_span is not None else ""
    if not nbest:
        nbest = [{"text": "", "score": 0.0, "start_logit": 0.0, "end_logit": 0.0}]
    scores = np.array([c["score"] for c in nbest])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    for c, p in zip(nbest, probs):
        c["probability"] = float(p)
    return answer, nbest, diff
