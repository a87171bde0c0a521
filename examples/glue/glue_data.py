"""GLUE data for `run_glue.py`: the task table, loading from the Hub, GLUE tsv files or csv/json files, and
the labels (regression or classes, dataset label -> model output).

Whatever the source, every split comes out with the column names and label ids of the Hub's `nyu-mll/glue`,
so a model fine-tuned on one source evaluates on another.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)

# Text columns of each task, as in transformers' run_glue.py.
TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
TASKS = tuple(TASK_TO_KEYS)

# Label names in the order of the Hub's ClassLabels, so that ids read from tsv files match the Hub's.
TASK_LABELS: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "stsb": None,  # regression: a similarity score from 0 to 5
    "wnli": ["not_entailment", "entailment"],
}

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields sit in the files of the original GLUE release (download_glue_data.py)."""

    folder: str
    columns: dict[str, str | int]  # output column -> header name, or position in files without a header
    label: str | int
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})

    @property
    def has_header(self) -> bool:
        return isinstance(self.label, str)


TSV_LAYOUTS: dict[str, TsvLayout] = {
    # CoLA alone ships without a header: source, label, original annotation, sentence.
    "cola": TsvLayout("CoLA", {"sentence": 3}, 1),
    "sst2": TsvLayout("SST-2", {"sentence": "sentence"}, "label"),
    "mrpc": TsvLayout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "stsb": TsvLayout("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "qqp": TsvLayout("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate"),
    "mnli": TsvLayout(
        "MNLI",
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
    ),
    "qnli": TsvLayout("QNLI", {"question": "question", "sentence": "sentence"}, "label"),
    "rte": TsvLayout("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
    "wnli": TsvLayout("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
}


def check_task(task_name: str | None) -> str | None:
    """Lower-cases a task name, or raises `ValueError` naming the allowed ones."""
    if task_name is None:
        return None
    task = task_name.lower().replace("-", "")
    if task not in TASK_TO_KEYS:
        raise ValueError(f"Unknown GLUE task {task_name!r}; allowed values: {list(TASKS)}.")
    return task


def eval_splits(task: str | None) -> list[str]:
    return list(TSV_LAYOUTS[task].eval_files) if task else ["validation"]


def label_id(task: str, value: str | float) -> int | float:
    """Turns a raw label (an id, a number as text, or a label name) into the Hub's label id."""
    if task == "stsb":
        return float(value)
    names = TASK_LABELS[task]
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        index = int(value)
    except ValueError:
        raise ValueError(f"Unknown label {value!r} for task {task}; expected an id or one of {names}.") from None
    if not 0 <= index < len(names):
        raise ValueError(f"Label id {index} out of range for task {task} ({len(names)} classes: {names}).")
    return index


def read_glue_tsv(path: str | Path, task: str) -> datasets.Dataset:
    """Reads one GLUE tsv file of `task` into a Dataset with the Hub's column names and label ids."""
    layout = TSV_LAYOUTS[task]
    # QUOTE_NONE: GLUE texts contain unbalanced quotes; utf-8-sig: MRPC's header starts with a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if layout.has_header:
        if not rows:
            raise ValueError(f"{path} is empty; expected a header with {list(layout.columns.values())}.")
        header, rows = rows[0], rows[1:]
        wanted = [*layout.columns.values(), layout.label]
        missing = [name for name in wanted if name not in header]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} for task {task}; its header is {header}.")
        positions = {out: header.index(name) for out, name in layout.columns.items()}
        label_pos = header.index(layout.label)
    else:
        positions, label_pos = dict(layout.columns), layout.label
    needed = max([label_pos, *positions.values()]) + 1
    data: dict[str, list] = {name: [] for name in [*positions, "label"]}
    skipped = 0
    for row in rows:
        if len(row) < needed:  # a few rows of the original QQP/MNLI files are broken; the Hub drops them too
            skipped += 1
            continue
        for name, pos in positions.items():
            data[name].append(row[pos])
        data["label"].append(label_id(task, row[label_pos]))
    if skipped:
        logger.warning(f"Skipped {skipped} malformed row(s) of {path}.")
    return datasets.Dataset.from_dict(data)


def _task_folder(data_dir: Path, task: str) -> Path:
    """`data_dir` may be the GLUE root (holding SST-2/, MRPC/, ...) or the task's own folder."""
    layout = TSV_LAYOUTS[task]
    nested = data_dir / layout.folder
    if nested.is_dir():
        return nested
    if any((data_dir / name).is_file() for name in layout.eval_files.values()):
        return data_dir
    return nested  # only used to name the expected path in the error


def load_glue_dir(data_dir: str | Path, task: str) -> datasets.DatasetDict:
    folder = _task_folder(Path(data_dir), task)
    splits = {}
    for split, name in {"train": "train.tsv", **TSV_LAYOUTS[task].eval_files}.items():
        path = folder / name
        if path.is_file():
            splits[split] = read_glue_tsv(path, task)
        elif split != "train":
            files = ",".join(["train.tsv", *TSV_LAYOUTS[task].eval_files.values()])
            raise ValueError(
                f"Missing GLUE file for task {task}: expected {path} "
                f"(the GLUE layout is <data_dir>/{TSV_LAYOUTS[task].folder}/{{{files}}})."
            )
    return datasets.DatasetDict(splits)


def _load_files(train_file: str | None, validation_file: str | None, task: str | None, cache_dir: str | None):
    if validation_file is None:
        raise ValueError("--validation_file is required with --train_file: the model is evaluated on it.")
    files = {"train": train_file, "validation": validation_file}
    files = {split: path for split, path in files.items() if path is not None}
    for split, path in files.items():
        if not Path(path).is_file():
            raise ValueError(f"The {split} file {path} does not exist.")
    extensions = {Path(path).suffix.lstrip(".") for path in files.values()}
    if extensions == {"tsv"}:
        if task is None:
            raise ValueError("tsv files are read in the GLUE layout of a task: pass --task_name with them.")
        return datasets.DatasetDict({split: read_glue_tsv(path, task) for split, path in files.items()})
    if len(extensions) != 1 or not extensions <= {"csv", "json", "jsonl"}:
        raise ValueError(f"--train_file/--validation_file must both be csv, json or jsonl; got {sorted(extensions)}.")
    builder = "csv" if extensions == {"csv"} else "json"
    raw = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    for split, ds in raw.items():
        if "label" not in ds.column_names:
            raise ValueError(f"The {split} file {files[split]} has no `label` column; its columns: {ds.column_names}.")
    if task is not None:  # a GLUE task in csv/json: accept label names as well as ids
        raw = raw.map(lambda ex: {"label": label_id(task, ex["label"])})
    return raw


def load_raw_datasets(
    task: str | None,
    data_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> datasets.DatasetDict:
    """Train (when there is one) and evaluation splits, from local files if given, else from the Hub."""
    if data_dir is not None:
        if task is None:
            raise ValueError(f"--data_dir needs --task_name (one of {list(TASKS)}) to know which folder to read.")
        if not Path(data_dir).is_dir():
            raise ValueError(f"--data_dir {data_dir} is not a directory.")
        return load_glue_dir(data_dir, task)
    if train_file is not None or validation_file is not None:
        return _load_files(train_file, validation_file, task, cache_dir)
    if task is None:
        raise ValueError(
            "Nothing to evaluate on: pass --task_name (one of "
            f"{list(TASKS)}), optionally with --data_dir, or --train_file/--validation_file."
        )
    try:
        raw = datasets.load_dataset(HUB_DATASET, task, cache_dir=cache_dir, token=token)
    except Exception as e:  # offline, no cache: say how to run from local files instead
        raise ValueError(
            f"Could not load {HUB_DATASET}/{task} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Offline, pass --data_dir with the GLUE tsv files, or --train_file/--validation_file."
        ) from e
    return datasets.DatasetDict({split: raw[split] for split in ["train", *eval_splits(task)] if split in raw})


def text_keys(task: str | None, column_names: list[str]) -> tuple[str, str | None]:
    """The one or two text columns; for custom files the same rule as transformers' run_glue.py."""
    if task is not None:
        return TASK_TO_KEYS[task]
    names = [name for name in column_names if name != "label"]
    if "sentence1" in names and "sentence2" in names:
        return "sentence1", "sentence2"
    if not names:
        raise ValueError(f"No text column besides `label` in {column_names}.")
    return (names[0], names[1]) if len(names) >= 2 else (names[0], None)


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
