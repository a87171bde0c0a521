"""SQuAD v2.0 exact match and F1 (with unanswerable questions) as an `evaluate` module that loads offline.

    metric = evaluate.load("examples/metrics/squad_v2")

Follows the official v2.0 evaluation script: a question whose gold answers are all empty after
normalisation is unanswerable and its only gold answer is ""; a prediction counts as "no answer" when it
is empty or when its `no_answer_probability` exceeds `no_answer_threshold`. Results are split into
answerable (`HasAns_*`) and unanswerable (`NoAns_*`) questions, and `best_*` report the scores at the
best no-answer threshold.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2018-know,
    title = "Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}",
    author = "Rajpurkar, Pranav and Jia, Robin and Liang, Percy",
    booktitle = "Proceedings of ACL 2018",
    year = "2018",
    pages = "784--789",
}
"""

_DESCRIPTION = """\
Exact match and token F1 of extractive question answering on SQuAD v2.0, where some questions have no
answer in the context, with the official answer normalisation and has-answer / no-answer breakdown.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of dicts with
        'id': the question id,
        'prediction_text': the predicted answer text ("" for no answer),
        'no_answer_probability': probability that the question has no answer (0.0 if the model decided).
    references: list of dicts with
        'id': the question id,
        'answers': {'text': gold answer texts (empty list if unanswerable), 'answer_start': their offsets}.
    no_answer_threshold: a prediction whose no_answer_probability is above this counts as "no answer".
Returns (percentages, totals are counts):
    'exact', 'f1', 'total',
    'HasAns_exact', 'HasAns_f1', 'HasAns_total' (only if some question is answerable),
    'NoAns_exact', 'NoAns_f1', 'NoAns_total' (only if some question is unanswerable),
    'best_exact', 'best_exact_thresh', 'best_f1', 'best_f1_thresh'.
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def compute_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        # "No answer" is right only against "no answer": 1 if both are empty, else 0.
        return float(gold_tokens == pred_tokens)
    num_same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _apply_threshold(
    raw: dict[str, float], na_probs: dict[str, float], has_answer: dict[str, bool], threshold: float
) -> dict[str, float]:
    # Above the threshold the prediction is "no answer", which is exactly right iff the question has none.
    return {qid: float(not has_answer[qid]) if na_probs[qid] > threshold else score for qid, score in raw.items()}


def _best_threshold(
    preds: dict[str, str], raw: dict[str, float], na_probs: dict[str, float], has_answer: dict[str, bool]
) -> tuple[float, float]:
    """Sweeps the no-answer threshold over the predicted probabilities; returns (best score %, threshold)."""
    # Threshold below every probability: all questions predicted unanswerable.
    score = best = float(sum(1 for qid in raw if not has_answer[qid]))
    best_thresh = 0.0
    for qid in sorted(raw, key=lambda q: na_probs[q]):
        # Raising the threshold past this question's probability turns its prediction back on.
        if has_answer[qid]:
            score += raw[qid]
        elif preds[qid]:
            score -= 1.0
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(raw), best_thresh


def squad_v2_scores(
    predictions: dict[str, str],
    na_probs: dict[str, float],
    gold_answers: dict[str, list[str]],
    no_answer_threshold: float = 1.0,
) -> dict[str, float]:
    if not gold_answers:
        raise ValueError("SQuAD v2 scores need at least one reference.")
    missing = sorted(set(gold_answers) - set(predictions))
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[:3]}.")
    has_answer: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, truths in gold_answers.items():
        truths = [t for t in truths if normalize_answer(t)] or [""]
        has_answer[qid] = truths != [""]
        exact_raw[qid] = float(max(compute_exact(t, predictions[qid]) for t in truths))
        f1_raw[qid] = max(compute_f1(t, predictions[qid]) for t in truths)
    na = {qid: float(na_probs.get(qid, 0.0)) for qid in gold_answers}
    exact = _apply_threshold(exact_raw, na, has_answer, no_answer_threshold)
    f1 = _apply_threshold(f1_raw, na, has_answer, no_answer_threshold)

    def summary(qids: list[str], prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
            f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / len(qids),
            f"{prefix}total": len(qids),
        }

    out = summary(list(gold_answers))
    has = [q for q in gold_answers if has_answer[q]]
    no = [q for q in gold_answers if not has_answer[q]]
    if has:
        out.update(summary(has, "HasAns_"))
    if no:
        out.update(summary(no, "NoAns_"))
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, na, has_answer)
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, na, has_answer)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float32"),
                    },
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

    def _compute(
        self, predictions: list[dict], references: list[dict], no_answer_threshold: float = 1.0
    ) -> dict[str, float]:
        preds = {p["id"]: p["prediction_text"] for p in predictions}
        na_probs = {p["id"]: p["no_answer_probability"] for p in predictions}
        gold = {r["id"]: list(r["answers"]["text"]) for r in references}
        return squad_v2_scores(preds, na_probs, gold, no_answer_threshold)
