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
from dataclasses import dataclass, field
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
    PretrainedConfig,
    PreTrainedModel,
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
from glue_data import TASK_LABELS, TASKS, check_task, eval_splits, load_raw_datasets, text_keys

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


def resolve_labels(raw: datasets.DatasetDict, task: str | None) -> tuple[bool, list | None]:
    """(is_regression, label_list) as in transformers' run_glue.py."""
    if task is not None:
        return task == "stsb", TASK_LABELS[task]
    reference = raw["train"] if "train" in raw else raw["validation"]
    if reference.features["label"].dtype in ("float32", "float64"):
        return True, None
    return False, sorted(set(reference.unique("label")) | set(raw["validation"].unique("label")))


def label_mapping(model: PreTrainedModel, task: str | None, label_list: list | None) -> dict | None:
    """Dataset label -> model output index (None: the same); names the model's labels when it has none."""
    if label_list is None:
        return None
    if task is not None and model.config.label2id != PretrainedConfig(num_labels=len(label_list)).label2id:
        # A model fine-tuned with named labels may order them differently from the Hub.
        model_labels = {str(k).lower(): int(v) for k, v in model.config.label2id.items()}
        if sorted(model_labels) == sorted(label_list):
            return {i: model_labels[name] for i, name in enumerate(label_list)}
        logger.warning(
            f"The model's labels {sorted(model_labels)} are not the task's {label_list}; ids used as they are."
        )
        return None
    model.config.label2id = {str(name): i for i, name in enumerate(label_list)}
    model.config.id2label = {i: str(name) for i, name in enumerate(label_list)}
    # GLUE data holds ids already; custom files hold raw values (names or numbers), mapped to their index.
    return None if task is not None else {name: i for i, name in enumerate(label_list)}


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


def main(args: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, QuantizationArguments, TrainingArguments))
    model_args, data_args, quant_args, training_args = parse_arguments(parser, args)
    _setup_logging(training_args)
    if not training_args.output_dir:
        raise ValueError("--output_dir is required: the quantized model and results.json are written there.")
    output_dir = Path(training_args.output_dir)
    task = data_args.task_name
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

    num_labels = 1 if is_regression else len(label_list)
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
    label_to_id = label_mapping(model, task, label_list)

    key1, key2 = text_keys(task, raw[eval_splits(task)[0]].column_names)

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        # No padding: calibration takes unpadded sequences, evaluation pads each batch.
        out = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        labels = examples["label"]
        out["labels"] = labels if label_to_id is None else [label_to_id[label] for label in labels]
        return out

    # Only what is used gets tokenized: the evaluation sets, the calibration draw and, to fine-tune, train.
    needed = {split: raw[split] for split in eval_splits(task)}
    if data_args.max_eval_samples is not None:
        needed = {s: ds.select(range(min(data_args.max_eval_samples, len(ds)))) for s, ds in needed.items()}
    calib_split = "train" if "train" in raw else eval_splits(task)[0]
    if calib_split != "train":
        logger.warning(
            f"No train split: calibrating on {qconfig.num_samples} samples of the '{calib_split}' split, the one "
            "being evaluated, so the quantized metrics are optimistic."
        )
    # Calibration: a seeded random draw of num_samples sentences (hf_qlimit then takes all of them).
    needed["calibration"] = (
        raw[calib_split].shuffle(seed=qconfig.seed).select(range(min(qconfig.num_samples, len(raw[calib_split]))))
    )
    if training_args.do_train:
        if "train" not in raw:
            raise ValueError("--do_train needs a train split, and the data has none.")
        needed["train"] = raw["train"]
        if data_args.max_train_samples is not None:
            needed["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
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
    collator = DataCollatorWithPadding(tokenizer)
    eval_sets = {split: tokenized[split] for split in eval_splits(task)}
    calib = tokenized["calibration"]
    calib = calib.select_columns([c for c in tokenizer.model_input_names if c in calib.column_names])

    if training_args.do_train:
        tick = time.perf_counter()
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=tokenized["train"],
            processing_class=tokenizer,
            data_collator=collator,
        )
        trainer.train()
        trainer.save_model(str(output_dir / "fp_model"))  # the fine-tuned FP model, to quantize again later
        timings["train_s"] = time.perf_counter() - tick

    device = training_args.device
    model.to(device)
    metric = load_metric(task, is_regression)
    eval_batch = training_args.per_device_eval_batch_size

    def run_eval(m: PreTrainedModel) -> dict[str, dict[str, float]]:
        return {
            split: evaluate_model(m, ds, collator, metric, eval_batch, device, is_regression)
            for split, ds in eval_sets.items()
        }

    tick = time.perf_counter()
    fp_metrics = run_eval(model)
    timings["fp_eval_s"] = time.perf_counter() - tick
    logger.info(f"FP metrics: {fp_metrics}")

    quant_settings = qconfig.to_dict()
    quant_settings.pop("layer_config", None)  # filled by quantization: per-module detail, not a setting

    tick = time.perf_counter()
    quantized = model.quantize_qlimit(calib, qconfig)
    model = quantized if isinstance(quantized, PreTrainedModel) else model
    timings["quantize_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    timings["save_s"] = time.perf_counter() - tick
    del model  # what is evaluated next is only what was written to disk

    tick = time.perf_counter()
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir).to(device)
    timings["load_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    q_metrics = run_eval(reloaded)
    timings["quantized_eval_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    logger.info(f"Quantized metrics: {q_metrics}")

    results = {
        "task": task,
        "model_name_or_path": model_args.model_name_or_path,
        "data": data_args.data_dir or data_args.validation_file or f"hub:nyu-mll/glue/{task}",
        "eval_samples": {split: len(ds) for split, ds in eval_sets.items()},
        "calibration": {"split": calib_split, "num_samples": len(calib), "seed": qconfig.seed},
        "fp": fp_metrics,
        "quantized": q_metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "qlimit_config": quant_settings,
        "environment": run_environment(device),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(_summary(task, quant_settings, fp_metrics, q_metrics, timings["quantize_s"]))
    return results


if __name__ == "__main__":
    main()
