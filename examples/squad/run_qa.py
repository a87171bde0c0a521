#!/usr/bin/env python
"""Post-training quantization of an extractive question-answering model with hf_qlimit, evaluated on SQuAD.

One run: evaluate the full-precision model, calibrate and quantize it on training features, evaluate the
quantized model, save it, reload it from disk and evaluate it again. Writes `results.json`, the
predictions of each stage and the quantized checkpoint to `--output_dir`, and logs a one-line summary.

    python examples/squad/run_qa.py --model_name_or_path ../shared/models/minilm-l6-squad \\
        --validation_file ../shared/data/squad/dev-v1.1.json --article_parity odd \\
        --max_seq_length 256 --doc_stride 64 --method qdrop --weight_bits 4 --act_bits 8 --output_dir out/squad
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from hf_qlimit.cli.arguments import QuantizationArguments, parse_arguments, parse_bits, run_environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils_qa import (
    PARITIES,
    load_squad_json,
    postprocess_qa_predictions,
    prepare_features,
    select_articles,
)

# A child of the "transformers" logger: it shares transformers' handler and format, while our own
# progress messages stay at INFO without turning on the library's verbose loading logs.
logger = logging.get_logger("transformers.examples.squad.run_qa")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local path (or Hub id) of a question-answering model."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (squad / squad_v2)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "SQuAD json to draw calibration features from."})
    validation_file: str | None = field(default=None, metadata={"help": "SQuAD json to evaluate on."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlapping tokens between windows of a long context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates per window."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2: questions may have no answer."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "v2: answer '' when null score - best span score exceeds this."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N questions."})
    article_parity: str = field(
        default="all",
        metadata={
            "help": "Evaluate on all articles, or those at even/odd positions once sorted by title.",
            "choices": list(PARITIES),
        },
    )
    calibration_article_parity: str | None = field(
        default=None,
        metadata={
            "help": "Articles of the calibration source; default: all of --train_file, or without a train "
            "set the articles of --validation_file that --article_parity leaves out.",
            "choices": list(PARITIES),
        },
    )
    eval_fp: bool = field(default=True, metadata={"help": "Evaluate the full-precision model first."})
    eval_reloaded: bool = field(default=True, metadata={"help": "Save, reload and evaluate the quantized model."})


@dataclass
class QAQuantizationArguments(QuantizationArguments):
    """`hf_qlimit.QuantizationArguments` plus the choice of a full-precision run only."""

    quantize: bool = field(default=True, metadata={"help": "Quantize (--no_quantize: full-precision run only)."})

    def label(self, method: str | None = None) -> str:
        """The run's label, e.g. "qdrop W4A8": `method` is what ran (the resolved config's), else --method."""
        act = parse_bits("act_bits", self.act_bits)
        return f"{method or self.method} W{self.weight_bits}A{act if act is not None else 16}"


def load_examples(data_args: DataTrainingArguments, model_args: ModelArguments) -> tuple[Dataset, Dataset | None]:
    """Returns (evaluation questions, calibration questions or None when there is no legitimate source)."""
    eval_parity, calib_parity = data_args.article_parity, data_args.calibration_article_parity
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
        eval_examples, calib_source = raw["validation"], raw.get("train")
    elif data_args.validation_file is not None:
        eval_examples = load_squad_json(data_args.validation_file)
        calib_source = load_squad_json(data_args.train_file) if data_args.train_file else None
    else:
        raise ValueError("Give --dataset_name or --validation_file.")
    if calib_source is None:
        # No training set: calibrate on the other half of the evaluation articles, never on evaluated ones.
        calib_source = eval_examples
        if calib_parity is None and eval_parity != "all":
            calib_parity = "odd" if eval_parity == "even" else "even"
        if calib_parity in (None, "all", eval_parity) or eval_parity == "all":
            calib_source = None
    eval_examples = select_articles(eval_examples, eval_parity)
    if data_args.max_eval_samples is not None:
        eval_examples = eval_examples.select(range(min(data_args.max_eval_samples, len(eval_examples))))
    if calib_source is not None:
        calib_source = select_articles(calib_source, calib_parity or "all")
    return eval_examples, calib_source


def calibration_features(
    examples: Dataset, tokenizer: PreTrainedTokenizerBase, data_args: DataTrainingArguments, num: int, seed: int
) -> Dataset:
    """`num` unpadded training windows drawn at random (seeded) from the calibration questions."""
    # Tokenize only as many questions as needed: each gives at least one window.
    picked = examples.shuffle(seed=seed).select(range(min(num, len(examples))))
    features = picked.map(
        prepare_features,
        batched=True,
        remove_columns=picked.column_names,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            max_seq_length=data_args.max_seq_length,
            doc_stride=data_args.doc_stride,
            for_eval=False,
        ),
        desc="Calibration features",
    )
    return features.shuffle(seed=seed).select(range(min(num, len(features))))


def predict_logits(
    model: PreTrainedModel, features: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start/end logits of every feature, unpadded, in feature order."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features.column_names]
    columns = {n: features[n] for n in names}
    lengths = [len(ids) for ids in columns["input_ids"]]
    # Batching windows of similar length wastes little compute on padding.
    order = np.argsort(lengths, kind="stable")
    starts: list[np.ndarray] = [np.empty(0)] * len(lengths)
    ends: list[np.ndarray] = [np.empty(0)] * len(lengths)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            batch = tokenizer.pad([{n: columns[n][i] for n in names} for i in rows], return_tensors="pt")
            out = model(**{k: v.to(device) for k, v in batch.items()})
            start, end = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            left = tokenizer.padding_side == "left"
            for r, i in enumerate(rows):
                span = slice(start.shape[1] - lengths[i], None) if left else slice(0, lengths[i])
                starts[i], ends[i] = start[r, span], end[r, span]
    return starts, ends


def load_metric(version_2: bool) -> evaluate.EvaluationModule:
    """The project's SQuAD metric, loaded by path so that no Hub access is needed."""
    path = Path(__file__).resolve().parents[1] / "metrics" / ("squad_v2" if version_2 else "squad")
    return evaluate.load(str(path))


def run_evaluation(
    stage: str,
    model: PreTrainedModel,
    examples: Dataset,
    features: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    metric: evaluate.EvaluationModule,
    data_args: DataTrainingArguments,
    batch_size: int,
    output_dir: str,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Predicts, decodes and scores one stage; writes `predictions_<stage>.json`."""
    t0 = time.perf_counter()
    starts, ends = predict_logits(model, features, tokenizer, batch_size)
    predictions, _, null_diffs = postprocess_qa_predictions(
        examples,
        features,
        starts,
        ends,
        version_2_with_negative=data_args.version_2_with_negative,
        n_best_size=data_args.n_best_size,
        max_answer_length=data_args.max_answer_length,
        null_score_diff_threshold=data_args.null_score_diff_threshold,
    )
    references = [{"id": ex["id"], "answers": ex["answers"]} for ex in examples]
    if data_args.version_2_with_negative:
        # The null decision is already in the text, so no probability is left to threshold.
        preds = [{"id": k, "prediction_text": v, "no_answer_probability": 0.0} for k, v in predictions.items()]
    else:
        preds = [{"id": k, "prediction_text": v} for k, v in predictions.items()]
    scores = metric.compute(predictions=preds, references=references)
    scores["eval_seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(output_dir, f"predictions_{stage}.json"), "w", encoding="utf-8") as f:
        json.dump(predictions, f, indent=1, ensure_ascii=False)
    if data_args.version_2_with_negative:  # null score - best span score, to tune the threshold afterwards
        with open(os.path.join(output_dir, f"null_odds_{stage}.json"), "w", encoding="utf-8") as f:
            json.dump(null_diffs, f, indent=1)
    logger.info(f"{stage}: {json.dumps(scores)}")
    return scores, starts


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _em_f1(scores: dict[str, Any]) -> str:
    em = scores.get("exact_match", scores.get("exact"))
    return f"EM {em:.2f} F1 {scores['f1']:.2f}"


def load_model(
    model_args: ModelArguments, data_args: DataTrainingArguments, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The FP model on `device` and its tokenizer; `--max_seq_length` is cut to what the tokenizer takes."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    model.to(device)
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(f"max_seq_length {data_args.max_seq_length} > model maximum {tokenizer.model_max_length}.")
        data_args.max_seq_length = tokenizer.model_max_length
    if data_args.doc_stride >= data_args.max_seq_length:
        raise ValueError("doc_stride must be smaller than max_seq_length.")
    return model, tokenizer


def evaluation_features(
    eval_examples: Dataset, tokenizer: PreTrainedTokenizerBase, data_args: DataTrainingArguments
) -> Dataset:
    """The evaluation windows, with the offsets and example ids that decoding needs."""
    return eval_examples.map(
        prepare_features,
        batched=True,
        remove_columns=eval_examples.column_names,
        fn_kwargs=dict(
            tokenizer=tokenizer, max_seq_length=data_args.max_seq_length, doc_stride=data_args.doc_stride, for_eval=True
        ),
        desc="Evaluation features",
    )


def quantize(
    model: PreTrainedModel,
    calib_examples: Dataset | None,
    tokenizer: PreTrainedTokenizerBase,
    data_args: DataTrainingArguments,
    quant_args: QAQuantizationArguments,
    seed: int,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The quantized model and the `quantization` entry of results.json (label, config, windows, seconds)."""
    if calib_examples is None:
        raise ValueError(
            "No calibration data: give --train_file (or a --dataset_name with a train split), or an "
            "--article_parity so that calibration uses the other articles of --validation_file."
        )
    qconfig = quant_args.to_config(seed=seed).for_model(model)  # seed: --quant_seed, else --seed
    calib = calibration_features(calib_examples, tokenizer, data_args, qconfig.num_samples, qconfig.seed)
    label = quant_args.label(qconfig.method)
    logger.info(f"Quantizing ({label}, preset {qconfig.preset}) on {len(calib)} calibration windows.")
    t0 = time.perf_counter()
    quantized = model.quantize_qlimit(calib, qconfig, **quant_args.quantize_kwargs())
    # quantize_qlimit works in place; accept a returned model too.
    model = quantized if isinstance(quantized, PreTrainedModel) else model
    return model, {
        "label": label,
        "config": {k: v for k, v in qconfig.to_dict().items() if k != "layer_config"},
        "calibration_features": len(calib),
        "quantize_seconds": round(time.perf_counter() - t0, 2),
    }


def parse(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, Any, TrainingArguments]:
    """The four argument dataclasses, from `argv`, the command line or a .json file; sets up logging."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, QAQuantizationArguments, TrainingArguments))
    model_args, data_args, quant_args, training_args = parse_arguments(parser, argv)
    logging.enable_default_handler()
    logging.enable_explicit_format()
    # INFO for this example (run_qa + utils_qa), while transformers itself stays at its own verbosity.
    logging.get_logger("transformers.examples.squad").setLevel(logging.INFO)
    return model_args, data_args, quant_args, training_args


def new_results(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    eval_examples: Dataset,
    eval_features: Dataset,
    device: torch.device,
) -> dict[str, Any]:
    """results.json before any evaluation: what ran on what, where; "results" fills in stage by stage."""
    return {
        "model": model_args.model_name_or_path,
        "task": "squad_v2" if data_args.version_2_with_negative else "squad",
        "eval_examples": len(eval_examples),
        "eval_features": len(eval_features),
        "data": {k: v for k, v in asdict(data_args).items() if k not in ("eval_fp", "eval_reloaded")},
        "environment": run_environment(device),
        "results": {},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, quant_args, training_args = parse(argv)
    set_seed(training_args.seed)
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)

    model, tokenizer = load_model(model_args, data_args, training_args.device)
    eval_examples, calib_examples = load_examples(data_args, model_args)
    eval_features = evaluation_features(eval_examples, tokenizer, data_args)
    logger.info(f"Evaluating on {len(eval_examples)} questions ({len(eval_features)} windows).")
    evaluate = partial(
        run_evaluation,
        examples=eval_examples,
        features=eval_features,
        tokenizer=tokenizer,
        metric=load_metric(data_args.version_2_with_negative),
        data_args=data_args,
        batch_size=training_args.per_device_eval_batch_size,
        output_dir=output_dir,
    )

    results = new_results(model_args, data_args, eval_examples, eval_features, training_args.device)
    scores = results["results"]
    summary = [f"[squad] {Path(model_args.model_name_or_path).name} | {len(eval_examples)} questions"]
    fp_starts = None
    if data_args.eval_fp:
        scores["fp"], fp_starts = evaluate("fp", model)
        summary.append(f"FP {_em_f1(scores['fp'])}")

    if quant_args.quantize:
        model, quantization = quantize(model, calib_examples, tokenizer, data_args, quant_args, training_args.seed)
        results["quantization"] = quantization
        scores["quantized"], q_starts = evaluate("quantized", model)
        if fp_starts is not None:  # how far quantization moved the logits, beyond what EM/F1 show
            quantization["max_abs_start_logit_diff_vs_fp"] = _max_diff(fp_starts, q_starts)
        summary.append(
            f"{quantization['label']} {_em_f1(scores['quantized'])} ({quantization['quantize_seconds']:.0f}s)"
        )
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        if data_args.eval_reloaded:
            del model  # the reloaded model must stand on what was written to disk alone
            reloaded = AutoModelForQuestionAnswering.from_pretrained(output_dir)
            reloaded.to(training_args.device)
            scores["reloaded"], r_starts = evaluate("reloaded", reloaded)
            quantization["max_abs_start_logit_diff_reloaded"] = _max_diff(q_starts, r_starts)
            summary.append(f"reloaded {_em_f1(scores['reloaded'])}")

    results["summary"] = " | ".join(summary)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    logger.info(results["summary"])
    print(results["summary"])
    return results


if __name__ == "__main__":
    main()
