"""Tests of examples/squad: SQuAD-format loading, windowing, span decoding, metrics and the full run.

Everything is built in tmp_path (tiny random BERT, vocab.txt tokenizer, SQuAD json fixture): no network,
no shared data.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bert
from transformers import BertForQuestionAnswering, BertTokenizerFast

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "squad"))

import run_qa  # noqa: E402
import utils_qa  # noqa: E402

WORDS = [
    "river",
    "mill",
    "village",
    "bridge",
    "stone",
    "tower",
    "garden",
    "market",
    "north",
    "south",
    "old",
    "new",
    "red",
    "blue",
    "small",
    "large",
    "king",
    "queen",
    "city",
    "road",
    "farm",
    "lake",
    "hill",
    "forest",
]
TITLES = ["Delta", "Alpha", "Charlie", "Bravo"]  # deliberately not sorted


def _article(title: str, rng: random.Random, n_paragraphs: int = 2, n_questions: int = 3, impossible: bool = False):
    paragraphs = []
    for p in range(n_paragraphs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(30, 45))]
        context = " ".join(words) + "."
        qas = []
        for q in range(n_questions):
            start_word = rng.randint(0, len(words) - 3)
            answer = " ".join(words[start_word : start_word + 2])
            answer_start = len(" ".join(words[:start_word])) + (1 if start_word else 0)
            assert context[answer_start : answer_start + len(answer)] == answer
            qid = f"{title}-{p}-{q}"
            qa = {
                "id": qid,
                "question": f"  what follows {words[start_word - 1] if start_word else 'start'} ?",
                "answers": [{"text": answer, "answer_start": answer_start}],
            }
            if impossible and q == 0:
                qa.update(answers=[], is_impossible=True)
            qas.append(qa)
        paragraphs.append({"context": context, "qas": qas})
    return {"title": title, "paragraphs": paragraphs}


def write_squad(path: Path, titles: list[str], seed: int, impossible: bool = False) -> Path:
    rng = random.Random(seed)
    path.write_text(json.dumps({"version": "test", "data": [_article(t, rng, impossible=impossible) for t in titles]}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("squad")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "what", "follows", "start"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 reads the vocabulary from `vocab=`; `vocab_file=` is silently ignored.
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    # tests/helpers.py's tiny BERT (2 layers of 32, 64 positions: the tests' windows are 32 tokens) with a QA head;
    # its vocabulary covers the tokenizer's, and its num_labels = 2 is the head's start and end logits.
    config = tiny_bert().config
    assert config.vocab_size >= len(vocab) and config.num_labels == 2
    torch.manual_seed(0)
    model_dir = root / "model"
    BertForQuestionAnswering(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {
        "model": model_dir,
        "dev": write_squad(root / "dev.json", TITLES, seed=1),
        "train": write_squad(root / "train.json", ["Echo", "Foxtrot"], seed=2),
        "dev_v2": write_squad(root / "dev_v2.json", TITLES, seed=3, impossible=True),
    }


# ----------------------------------------------------------------------------- data loading and windows


def test_article_parity_sorts_titles(tiny):
    ds = utils_qa.load_squad_json(str(tiny["dev"]))
    assert len(ds) == 4 * 2 * 3
    assert set(utils_qa.select_articles(ds, "even")["title"]) == {"Alpha", "Charlie"}
    assert set(utils_qa.select_articles(ds, "odd")["title"]) == {"Bravo", "Delta"}
    assert len(utils_qa.select_articles(ds, "all")) == len(ds)
    with pytest.raises(ValueError):
        utils_qa.select_articles(ds, "third")


def test_calibration_never_uses_evaluated_articles(tiny):
    args = run_qa.DataTrainingArguments(validation_file=str(tiny["dev"]), article_parity="odd")
    eval_ex, calib_ex = run_qa.load_examples(args, run_qa.ModelArguments(model_name_or_path="unused"))
    assert set(eval_ex["title"]) == {"Bravo", "Delta"}
    assert set(calib_ex["title"]) == {"Alpha", "Charlie"}
    # Without a train file or a parity split the only calibration source would be the evaluated questions.
    args = run_qa.DataTrainingArguments(validation_file=str(tiny["dev"]))
    assert run_qa.load_examples(args, run_qa.ModelArguments(model_name_or_path="unused"))[1] is None


def test_v2_impossible_questions_have_no_answers(tiny):
    ds = utils_qa.load_squad_json(str(tiny["dev_v2"]))
    impossible = ds.filter(lambda ex: ex["is_impossible"])
    assert len(impossible) == 8 and all(a["text"] == [] for a in impossible["answers"])


def test_long_contexts_overflow_into_windows_with_context_offsets(tiny):
    tokenizer = BertTokenizerFast.from_pretrained(tiny["model"])
    ds = utils_qa.load_squad_json(str(tiny["dev"]))
    batch = ds[:6]
    feats = utils_qa.prepare_features(batch, tokenizer, max_seq_length=32, doc_stride=8, for_eval=True)
    assert len(feats["input_ids"]) > 6  # contexts of 30+ words cannot fit 32 tokens with the question
    assert all(len(ids) <= 32 for ids in feats["input_ids"])
    for ids, offsets, ex_id in zip(feats["input_ids"], feats["offset_mapping"], feats["example_id"]):
        assert ex_id in batch["id"]
        assert offsets[0] is None and offsets[-1] is None  # [CLS] and final [SEP] are never answers
        context = batch["context"][batch["id"].index(ex_id)]
        for token_id, o in zip(ids, offsets):
            if o is not None:
                assert context[o[0] : o[1]] == tokenizer.convert_ids_to_tokens(token_id)
    plain = utils_qa.prepare_features(batch, tokenizer, max_seq_length=32, doc_stride=8, for_eval=False)
    assert set(plain) == {"input_ids", "token_type_ids", "attention_mask"}


def test_oracle_logits_score_100(tiny):
    """Pre-processing, decoding and metric together: logits peaked on the gold span give EM = F1 = 100."""
    tokenizer = BertTokenizerFast.from_pretrained(tiny["model"])
    ds = utils_qa.load_squad_json(str(tiny["dev"]))
    feats = ds.map(
        utils_qa.prepare_features,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=32, doc_stride=8, for_eval=True),
    )
    answers = {ex["id"]: (ex["answers"]["answer_start"][0], ex["answers"]["text"][0]) for ex in ds}
    starts, ends = [], []
    for f in feats:
        a_start, text = answers[f["example_id"]]
        s, e = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        for k, o in enumerate(f["offset_mapping"]):
            if o is not None and o[0] == a_start:
                s[k] = 5.0
            if o is not None and o[1] == a_start + len(text):
                e[k] = 5.0
        starts.append(s)
        ends.append(e)
    preds, nbest, _ = utils_qa.postprocess_qa_predictions(ds, feats, starts, ends, n_best_size=5)
    assert preds == {k: v[1] for k, v in answers.items()}
    assert all(abs(sum(c["probability"] for c in lst) - 1) < 1e-6 for lst in nbest.values())
    metric = run_qa.load_metric(version_2=False)
    refs = [{"id": ex["id"], "answers": ex["answers"]} for ex in ds]
    scores = metric.compute(predictions=[{"id": k, "prediction_text": v} for k, v in preds.items()], references=refs)
    assert scores == {"exact_match": 100.0, "f1": 100.0}


# ----------------------------------------------------------------------------- hand-made decoding cases

CONTEXT = "zero one two three four five six seven"
_WORD_OFFSETS = [(i, i + len(w)) for i, w in ((CONTEXT.index(w), w) for w in CONTEXT.split())]


def _window(words: range) -> list:
    # [CLS] question [SEP] context words [SEP]: only the context words carry offsets.
    return [None, None, None] + [_WORD_OFFSETS[w] for w in words] + [None]


def _logits(window: list, peaks: dict[int, float], cls: float = -5.0) -> np.ndarray:
    out = np.full(len(window), -5.0)
    out[0] = cls
    for word, value in peaks.items():
        out[next(k for k, o in enumerate(window) if o == _WORD_OFFSETS[word])] = value
    return out


def _decode(features, starts, ends, **kwargs):
    example = [{"id": "q", "context": CONTEXT}]
    feats = [{"example_id": "q", "offset_mapping": f} for f in features]
    return utils_qa.postprocess_qa_predictions(example, feats, starts, ends, **kwargs)


def test_best_span_never_crosses_windows():
    w0, w1 = _window(range(5)), _window(range(3, 8))
    # Globally the best start is "four" (window 0) and the best end "six" (window 1): "four five six" would
    # score 20, but no window holds both; inside window 1, "five six" scores 3 + 10 = 13 > 10 + 1 = 11.
    starts = [_logits(w0, {4: 10.0}), _logits(w1, {5: 3.0})]
    ends = [_logits(w0, {4: 1.0}), _logits(w1, {6: 10.0})]
    preds, nbest, _ = _decode([w0, w1], starts, ends)
    assert preds["q"] == "five six"
    assert nbest["q"][0]["score"] == pytest.approx(13.0)
    # "four five six" exists only inside window 1, with that window's own start logit for "four".
    crossing = [c for c in nbest["q"] if c["text"] == "four five six"]
    assert [c["score"] for c in crossing] == [pytest.approx(-5.0 + 10.0)]


def test_too_long_span_is_skipped_and_question_tokens_ignored():
    w = _window(range(8))
    starts = [_logits(w, {1: 8.0, 4: 2.0})]
    ends = [_logits(w, {5: 8.0, 4: 3.0})]
    starts[0][1] = 50.0  # a question token: no offset, must never start an answer
    # "one ... five" (16) is 5 tokens; with at most 2 the best is "four five" (2 + 8), not "four" (2 + 3).
    preds, _, _ = _decode([w], starts, ends, max_answer_length=2)
    assert preds["q"] == "four five"
    preds, _, _ = _decode([w], starts, ends, max_answer_length=5)
    assert preds["q"] == "one two three four five"


def test_v2_null_answer_uses_threshold_and_least_confident_window():
    w0, w1 = _window(range(5)), _window(range(3, 8))
    starts = [_logits(w0, {1: 2.0}, cls=6.0), _logits(w1, {6: 1.0}, cls=4.0)]
    ends = [_logits(w0, {2: 2.0}, cls=6.0), _logits(w1, {7: 1.0}, cls=4.0)]
    # Null score = min over windows = 8, best span "one two" = 4: diff 4.
    preds, nbest, diffs = _decode([w0, w1], starts, ends, version_2_with_negative=True)
    assert preds["q"] == "" and diffs["q"] == pytest.approx(4.0)
    assert nbest["q"][0]["text"] == "" and nbest["q"][0]["score"] == pytest.approx(8.0)
    preds, _, _ = _decode([w0, w1], starts, ends, version_2_with_negative=True, null_score_diff_threshold=4.5)
    assert preds["q"] == "one two"
    preds, _, diffs = _decode([w0, w1], starts, ends)  # v1 never answers with the null span
    assert preds["q"] == "one two" and diffs == {}


# ----------------------------------------------------------------------------- metrics


def test_squad_metric_official_normalisation():
    metric = run_qa.load_metric(version_2=False)
    refs = [
        {"id": "a", "answers": {"text": ["Eiffel Tower", "tower"], "answer_start": [0, 7]}},
        {"id": "b", "answers": {"text": ["red  blue"], "answer_start": [0]}},
    ]
    preds = [{"id": "a", "prediction_text": "The Eiffel tower!"}, {"id": "b", "prediction_text": "red green"}]
    scores = metric.compute(predictions=preds, references=refs)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.5) / 2)


def test_squad_v2_metric_has_and_no_answer():
    metric = run_qa.load_metric(version_2=True)
    refs = [
        {"id": "a", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "b", "answers": {"text": [], "answer_start": []}},
        {"id": "c", "answers": {"text": [], "answer_start": []}},
    ]
    preds = [
        {"id": "a", "prediction_text": "in Paris", "no_answer_probability": 0.0},
        {"id": "b", "prediction_text": "", "no_answer_probability": 0.0},
        {"id": "c", "prediction_text": "Lyon", "no_answer_probability": 0.9},
    ]
    s = metric.compute(predictions=preds, references=refs, no_answer_threshold=0.5)
    assert (s["total"], s["HasAns_total"], s["NoAns_total"]) == (3, 1, 2)
    assert s["HasAns_exact"] == 0.0 and s["HasAns_f1"] == pytest.approx(100 * 2 / 3)
    assert s["NoAns_exact"] == 100.0  # "c" is thresholded into "no answer"
    s = metric.compute(predictions=preds, references=refs, no_answer_threshold=1.0)
    assert s["NoAns_exact"] == 50.0


# ----------------------------------------------------------------------------- end to end


def _run(tiny, tmp_path, *extra: str, dev: str = "dev") -> dict:
    argv = [
        "--model_name_or_path",
        str(tiny["model"]),
        "--validation_file",
        str(tiny[dev]),
        "--max_seq_length",
        "32",
        "--doc_stride",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    return run_qa.main(argv)


def test_full_precision_run_v2(tiny, tmp_path):
    results = _run(
        tiny, tmp_path, "--no_quantize", "--version_2_with_negative", "--article_parity", "even", dev="dev_v2"
    )
    assert results["eval_examples"] == 12 and results["eval_features"] > 12
    fp = results["results"]["fp"]
    assert fp["total"] == 12 and fp["NoAns_total"] == 4 and 0.0 <= fp["f1"] <= 100.0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["results"]["fp"] == fp
    predictions = json.loads((tmp_path / "out" / "predictions_fp.json").read_text())
    assert len(predictions) == 12 and "quantized" not in written["results"]


def test_quantize_save_reload_end_to_end(tiny, tmp_path):
    results = _run(
        tiny,
        tmp_path,
        "--train_file",
        str(tiny["train"]),
        "--method",
        "rtn",
        "--weight_bits",
        "4",
        "--act_bits",
        "8",
        "--num_samples",
        "6",
        "--batch_size",
        "2",
        "--max_eval_samples",
        "10",
        "--work_dir",
        str(tmp_path / "work"),
    )
    out = tmp_path / "out"
    assert (tmp_path / "work" / "progress.json").is_file()  # quantize_qlimit got --work_dir
    assert set(results["results"]) == {"fp", "quantized", "reloaded"}
    assert results["eval_examples"] == 10
    assert results["quantization"]["calibration_features"] == 6
    assert results["quantization"]["config"]["method"] == "rtn"
    assert results["quantization"]["max_abs_start_logit_diff_vs_fp"] > 1e-4  # the weights really changed
    # What was saved is what was evaluated: reloading changes nothing.
    assert results["quantization"]["max_abs_start_logit_diff_reloaded"] < 1e-4
    assert results["results"]["reloaded"]["f1"] == pytest.approx(results["results"]["quantized"]["f1"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "qlimit"
    assert (out / "tokenizer.json").exists() and (out / "predictions_reloaded.json").exists()
    assert results["summary"].startswith("[squad] model | 10 questions | FP EM")
