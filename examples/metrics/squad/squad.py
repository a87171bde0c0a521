"""SQuAD v1.1 exact match and F1 as an `evaluate` module that loads offline.

Load it by path, which needs no Hugging Face Hub access (works with `HF_HUB_OFFLINE=1`):

    metric = evaluate.load("examples/metrics/squad")

Scores follow the official v1.1 evaluation script: answers are normalised (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed), each prediction takes its best score over the gold answers,
and both metrics are percentages.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP 2016",
    year = "2016",
    pages = "2383--2392",
}
"""

_DESCRIPTION = """\
Exact match and token F1 of extractive question answering on SQuAD v1.1, with the official answer
normalisation. Every question must have at least one gold answer (use `squad_v2` for unanswerable ones).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of dicts with
        'id': the question id,
        'prediction_text': the predicted answer text.
    references: list of dicts with
        'id': the question id,
        'answers': {'text': list of gold answer texts, 'answer_start': list of their character offsets}.
Returns:
    'exact_match': percentage of predictions equal to a gold answer after normalisation,
    'f1': mean over questions of the best token-overlap F1 against the gold answers, in percent.
Example:
    >>> squad = evaluate.load("examples/metrics/squad")
    >>> squad.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "the Eiffel Tower"}],
    ...     references=[{"id": "q1", "answers": {"text": ["Eiffel Tower"], "answer_start": [10]}}],
    ... )
    {'exact_match': 100.0, 'f1': 100.0}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    # Counter intersection counts a repeated token only as often as it occurs in both answers.
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_ground_truths(score_fn, prediction: str, ground_truths: Iterable[str]) -> float:
    return max(score_fn(prediction, truth) for truth in ground_truths)


def squad_v1_scores(predictions: dict[str, str], gold_answers: dict[str, list[str]]) -> dict[str, float]:
    """EM and F1 (percent) over the questions of `gold_answers`; a question without a prediction scores 0."""
    if not gold_answers:
        raise ValueError("SQuAD scores need at least one reference.")
    exact = f1 = 0.0
    for qid, truths in gold_answers.items():
        if not truths:
            raise ValueError(f"Question {qid!r} has no gold answer; SQuAD v1.1 needs one (use squad_v2).")
        if qid not in predictions:
            continue
        exact += best_over_ground_truths(exact_match_score, predictions[qid], truths)
        f1 += best_over_ground_truths(f1_score, predictions[qid], truths)
    total = len(gold_answers)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": {
                            "text": datasets.Sequence(datasets.Value("string")),
                            "answer_start": datasets.Sequence(datasets.Value("int32")),
                        },
                    },
                }
            ),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions: list[dict], references: list[dict]) -> dict[str, float]:
        pred_texts = {pred["id"]: pred["prediction_text"] for pred in predictions}
        gold = {ref["id"]: list(ref["answers"]["text"]) for ref in references}
        return squad_v1_scores(pred_texts, gold)
