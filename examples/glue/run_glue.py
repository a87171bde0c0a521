#!/usr/bin/env python
"""Quantize a sequence classifier with hf_qlimit (RTN / AdaRound / BRECQ / QDrop) and evaluate it on GLUE.

Evaluates the full-precision model, quantizes it from `num_samples` training sentences, saves it to
`--output_dir`, reloads it from disk with `from_pretrained` and evaluates the reloaded model; writes
`results.json` there and prints a one-line summary. Works offline with `--data_dir` (GLUE tsv layout) or
`--train_file/--validation_file` (csv/json). `--do_train` fine-tunes the model with the Trainer first.

    python examples/glue/run_glue.py --model_name_or_path ../shared/models/minilm-l6-sst2 \
        --task_name sst2 --data_dir ../shared/data/glue --method qdrop --weight_bits 4 --act_bits 8 \
        --output_dir out/sst2-w4a8
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_qlimit.cli.arguments import (  # importing hf_qlimit adds PreTrainedModel.quantize_qlimit
    QuantizationArguments,
    parse_arguments,
    run_environment,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # glue_data.py sits beside this script
from glue_data import TASKS, check_task, eval_splits, label_mapping, load_raw_datasets, resolve_labels, text_keys

logger = hf_logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path or Hub id of the model to quantize."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with code on the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a head whose number of labels differs from the task's."}
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"GLUE task, one of {list(TASKS)}."})
    data_dir: str | None = field(
        default=None, metadata={"help": "GLUE root (with SST-2/, MRPC/, ...) or one task's folder of tsv files."}
    )
    train_file: str | None = field(default=None, metadata={"help": "csv/json(l) file of training (calibration) data."})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json(l) file of evaluation data."})
    max_seq_length: int = field(default=128, metadata={"help": "Sequences are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fine-tune on at most this many rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows per split."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize cached Hub datasets."})

    def __post_init__(self) -> None:
        self.task_name = check_task(self.task_name)


def glue_metric_path() -> str:
    """The GLUE `evaluate` module of the examples (examples/metrics/glue), loaded by path: no Hub access."""
    return str(Path(__file__).resolve().parents[1] / "metrics" / "glue" / "glue.py")


def load_metric(task: str | None, is_regression: bool) -> evaluate.EvaluationModule:
    # Custom files get the metric of a GLUE task of the same kind: accuracy, or Pearson/Spearman.
    config_name = task or ("stsb" if is_regression else "sst2")
    return evaluate.load(glue_metric_path(), config_name=config_name, keep_in_memory=True)


def evaluate_model(
    model: PreTrainedModel,
    dataset: datasets.Dataset,
    collator: DataCollatorWithPadding,
    metric: evaluate.EvaluationModule,
    batch_size: int,
    device: torch.device,
    is_regression: bool,
) -> dict[str, float]:
    """Metric of `model` on `dataset` (tokenized, unpadded, with `labels`), batches padded as they come."""
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            references.append(batch.pop("labels").numpy())
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            predictions.append(logits[:, 0].numpy() if is_regression else logits.argmax(-1).numpy())
    return metric.compute(predictions=np.concatenate(predictions), references=np.concatenate(references))


def evaluate_splits(
    eval_sets: dict[str, datasets.Dataset],
    collator: DataCollatorWithPadding,
    metric: evaluate.EvaluationModule,
    batch_size: int,
    device: torch.device,
    is_regression: bool,
    model: PreTrainedModel,
) -> dict[str, dict[str, float]]:
    """`evaluate_model` on every evaluation split."""
    return {
        split: evaluate_model(model, ds, collator, metric, batch_size, device, is_regression)
        for split, ds in eval_sets.items()
    }


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(  # no-op where a handler exists already (pytest, a calling script)
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO)
    if training_args.log_level != "passive":  # only then: transformers at INFO is very verbose
        level = training_args.get_process_log_level()
        logger.setLevel(level)
        datasets.utils.logging.set_verbosity(level)
        hf_logging.set_verbosity(level)


def _summary(task: str | None, quant: dict[str, Any], fp: dict, quantized: dict, seconds: float) -> str:
    bits = (
        f"W{quant['weight_bits']}A{quant['act_bits']}" if quant["act_bits"] else f"W{quant['weight_bits']} weight-only"
    )
    parts = [task or "custom", f"{quant['method']} {bits}"]
    for split, metrics in fp.items():
        for name, value in metrics.items():
            q, where = quantized[split][name], split.replace("validation", "dev")
            parts.append(f"{where} {name} FP {value:.4f} -> Q {q:.4f} ({100 * (q - value):+.2f} pts)")
    parts.append(f"quantized in {seconds:.1f}s")
    return " | ".join(parts)


@dataclass
class GlueData:
    """The tokenized (unpadded) data of a run: evaluation sets, the calibration draw, the fine-tuning set."""

    eval_sets: dict[str, datasets.Dataset]
    calib: datasets.Dataset  # model inputs only
    calib_split: str
    train: datasets.Dataset | None


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Adds the seconds the block took to `timings[key]` (only if it finished)."""
    tick = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - tick


def load_model(
    model_args: ModelArguments, task: str | None, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The FP classifier (with `num_labels` outputs) and its tokenizer."""
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, num_labels=num_labels, finetuning_task=task, **common
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **common)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **common,
    )
    return model, tokenizer


def _needed_splits(
    raw: datasets.DatasetDict, data_args: DataTrainingArguments, num_samples: int, seed: int, do_train: bool
) -> tuple[dict[str, datasets.Dataset], str]:
    """Only what is used gets tokenized: the evaluation sets, the calibration draw and, to fine-tune, train."""
    task = data_args.task_name
    needed = {split: raw[split] for split in eval_splits(task)}
    if data_args.max_eval_samples is not None:
        needed = {s: ds.select(range(min(data_args.max_eval_samples, len(ds)))) for s, ds in needed.items()}
    calib_split = "train" if "train" in raw else eval_splits(task)[0]
    if calib_split != "train":
        logger.warning(
            f"No train split: calibrating on {num_samples} samples of the '{calib_split}' split, the one "
            "being evaluated, so the quantized metrics are optimistic."
        )
    # Calibration: a seeded random draw of num_samples sentences (hf_qlimit then takes all of them).
    needed["calibration"] = raw[calib_split].shuffle(seed=seed).select(range(min(num_samples, len(raw[calib_split]))))
    if do_train:
        if "train" not in raw:
            raise ValueError("--do_train needs a train split, and the data has none.")
        needed["train"] = raw["train"]
        if data_args.max_train_samples is not None:
            needed["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    return needed, calib_split


def prepare_data(
    raw: datasets.DatasetDict,
    data_args: DataTrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    label_to_id: dict | None,
    qconfig: Any,
    do_train: bool,
) -> GlueData:
    """Tokenizes what the run needs, without padding: calibration takes unpadded sequences, evaluation pads each
    batch."""
    task = data_args.task_name
    key1, key2 = text_keys(task, raw[eval_splits(task)[0]].column_names)

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        out = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        labels = examples["label"]
        out["labels"] = labels if label_to_id is None else [label_to_id[label] for label in labels]
        return out

    needed, calib_split = _needed_splits(raw, data_args, qconfig.num_samples, qconfig.seed, do_train)
    tokenized = {
        split: ds.map(
            preprocess,
            batched=True,
            remove_columns=ds.column_names,
            desc=f"Tokenizing {split}",
            load_from_cache_file=not data_args.overwrite_cache,
        )
        for split, ds in needed.items()
    }
    calib = tokenized["calibration"]
    calib = calib.select_columns([c for c in tokenizer.model_input_names if c in calib.column_names])
    eval_sets = {split: tokenized[split] for split in eval_splits(task)}
    return GlueData(eval_sets, calib, calib_split, tokenized.get("train"))


def fine_tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: datasets.Dataset,
    collator: DataCollatorWithPadding,
    training_args: TrainingArguments,
    output_dir: Path,
) -> None:
    """`--do_train`: the Trainer fine-tunes `model` in place; the FP result is saved to `output_dir/fp_model`."""
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer.train()
    trainer.save_model(str(output_dir / "fp_model"))  # the fine-tuned FP model, to quantize again later


def quantize_and_save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    calib: datasets.Dataset,
    qconfig: Any,
    quant_args: QuantizationArguments,
    output_dir: Path,
    timings: dict[str, float],
) -> None:
    """Quantizes `model` in place and saves it with its tokenizer to `output_dir`."""
    with timed(timings, "quantize_s"):
        quantized = model.quantize_qlimit(calib, qconfig, **quant_args.quantize_kwargs())
        model = quantized if isinstance(quantized, PreTrainedModel) else model
    with timed(timings, "save_s"):
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)


def write_results(
    output_dir: Path,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    data: GlueData,
    qconfig: Any,
    fp_metrics: dict,
    q_metrics: dict,
    timings: dict[str, float],
    quant_settings: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Writes results.json and prints the one-line summary; returns the results."""
    task = data_args.task_name
    results = {
        "task": task,
        "model_name_or_path": model_args.model_name_or_path,
        "data": data_args.data_dir or data_args.validation_file or f"hub:nyu-mll/glue/{task}",
        "eval_samples": {split: len(ds) for split, ds in data.eval_sets.items()},
        "calibration": {"split": data.calib_split, "num_samples": len(data.calib), "seed": qconfig.seed},
        "fp": fp_metrics,
        "quantized": q_metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "qlimit_config": quant_settings,
        "environment": run_environment(device),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(_summary(task, quant_settings, fp_metrics, q_metrics, timings["quantize_s"]))
    return results


def parse(args: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, Any, TrainingArguments]:
    """The four argument dataclasses, from `args`, the command line or a .json file; sets up logging."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, QuantizationArguments, TrainingArguments))
    model_args, data_args, quant_args, training_args = parse_arguments(parser, args)
    _setup_logging(training_args)
    if not training_args.output_dir:
        raise ValueError("--output_dir is required: the quantized model and results.json are written there.")
    return model_args, data_args, quant_args, training_args


def main(args: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, quant_args, training_args = parse(args)
    output_dir, task = Path(training_args.output_dir), data_args.task_name
    start = time.perf_counter()
    timings: dict[str, float] = {}
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments or the data fails here, before any model work.
    raw = load_raw_datasets(
        task,
        data_args.data_dir,
        data_args.train_file,
        data_args.validation_file,
        model_args.cache_dir,
        model_args.token,
    )
    is_regression, label_list = resolve_labels(raw, task)
    # sequence classification: the encoder presets (preset "auto" resolves to "fast")
    qconfig = quant_args.to_config(seed=training_args.seed, max_length=data_args.max_seq_length).resolved(
        causal_lm=False
    )
    model, tokenizer = load_model(model_args, task, 1 if is_regression else len(label_list))
    label_to_id = label_mapping(model, task, label_list)
    data = prepare_data(raw, data_args, tokenizer, label_to_id, qconfig, training_args.do_train)
    collator = DataCollatorWithPadding(tokenizer)
    if training_args.do_train:
        with timed(timings, "train_s"):
            fine_tune(model, tokenizer, data.train, collator, training_args, output_dir)

    device = training_args.device
    model.to(device)
    metric, batch_size = load_metric(task, is_regression), training_args.per_device_eval_batch_size
    run_eval = partial(evaluate_splits, data.eval_sets, collator, metric, batch_size, device, is_regression)
    with timed(timings, "fp_eval_s"):
        fp_metrics = run_eval(model)
    logger.info(f"FP metrics: {fp_metrics}")
    quant_settings = qconfig.to_dict()
    quant_settings.pop("layer_config", None)  # filled by quantization: per-module detail, not a setting
    quantize_and_save(model, tokenizer, data.calib, qconfig, quant_args, output_dir, timings)
    del model  # what is evaluated next is only what was written to disk
    with timed(timings, "load_s"):
        reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir).to(device)
    with timed(timings, "quantized_eval_s"):
        q_metrics = run_eval(reloaded)
    timings["total_s"] = time.perf_counter() - start
    logger.info(f"Quantized metrics: {q_metrics}")

    return write_results(
        output_dir, model_args, data_args, data, qconfig, fp_metrics, q_metrics, timings, quant_settings, device
    )


if __name__ == "__main__":
    main()
