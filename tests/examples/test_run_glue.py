"""examples/glue/run_glue.py end to end on tiny GLUE-format tsv fixtures and a tiny random BERT, plus its
data reader, its errors and the GLUE metric module in examples/metrics/glue."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
)

REPO = Path(__file__).resolve().parents[2]
GLUE_DIR = REPO / "examples" / "glue"

POSITIVE = ["good", "great", "fun", "moving"]
NEGATIVE = ["bad", "awful", "boring", "dull"]
FILLER = ["the", "a", "movie", "plot", "is", "was", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, GLUE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    sys.path.insert(0, str(GLUE_DIR))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_glue():
    return _load_script("run_glue")


@pytest.fixture(scope="module")
def glue_data():
    return _load_script("glue_data")


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is their polarity words: learnable by a tiny model in a few steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(POSITIVE if label else NEGATIVE, size=2)) + list(rng.choice(FILLER, size=3))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_sst2(root: Path, n_train: int = 64, n_dev: int = 12) -> None:
    for name, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        _write(root / "SST-2" / f"{name}.tsv", ["sentence\tlabel"] + [f"{s} \t{y}" for s, y in _sentences(n, seed)])


def write_mrpc(root: Path, n_train: int = 10, n_dev: int = 9) -> None:
    for name, n, seed in (("train", n_train, 2), ("dev", n_dev, 3)):
        # The original files start with a BOM and hold unbalanced quotes.
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [
            f'{y}\t{100 + i}\t{200 + i}\t"{s}\t{s.split()[0]} movie .' for i, (s, y) in enumerate(_sentences(n, seed))
        ]
        _write(root / "MRPC" / f"{name}.tsv", lines)


def write_stsb(root: Path, n_dev: int = 10) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [
        f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s}\t{s} good\t{i * 0.5:.3f}"
        for i, (s, _) in enumerate(_sentences(n_dev, 4))
    ]
    _write(root / "STS-B" / "dev.tsv", [header, *rows])  # no train.tsv: calibrates on dev


def save_tiny_bert(
    path: Path, num_labels: int, balance_on: list[tuple[str, ...]] | None = None, trained: bool = False
) -> Path:
    """A random 2-layer BERT and an offline WordPiece tokenizer over VOCAB.

    To be used untrained (not `trained`), weights are drawn wider than BERT's 0.02 so that outputs vary by input.
    `balance_on`: texts on which the classifier bias is shifted so that half are predicted 1 and half 0, each
    with a clear margin: a random model alone predicts one class for everything, which would test little.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
        initializer_range=0.02 if trained else 0.2,
    )
    model = BertForSequenceClassification(config).eval()
    if balance_on is not None:
        with torch.no_grad():
            logits = torch.cat([model(**tokenizer(*t, return_tensors="pt")).logits for t in balance_on])
            diffs = (logits[:, 1] - logits[:, 0]).sort().values
            k = len(diffs) // 2
            model.classifier.bias[1] -= (diffs[k - 1] + diffs[k]) / 2
    model.save_pretrained(path)
    return path


def _predict(model_dir: Path, texts: list[tuple[str, ...]]) -> np.ndarray:
    """Logits of a checkpoint on texts, one at a time: no padding, no batching, independent of the script."""
    import hf_qlimit  # noqa: F401 - registers the quantizer that from_pretrained needs for quantized checkpoints

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.stack([model(**tokenizer(*t, return_tensors="pt")).logits[0].numpy() for t in texts])


def _common(model: Path, out: Path, data_dir: Path, task: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--task_name",
        task,
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--method",
        "rtn",
        "--weight_bits",
        "8",
        "--act_bits",
        "8",
        "--num_samples",
        "8",
        "--per_device_eval_batch_size",
        "4",
        "--max_seq_length",
        "32",
    ]


def test_sst2_finetune_quantize_reload(run_glue, tmp_path):
    write_sst2(tmp_path / "glue")
    model = save_tiny_bert(tmp_path / "model", num_labels=2, trained=True)
    out = tmp_path / "out"
    args = _common(model, out, tmp_path / "glue", "sst2") + [
        "--do_train",
        "--num_train_epochs",
        "4",
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "1",
    ]
    results = run_glue.main(args)

    assert results == json.loads((out / "results.json").read_text())
    # The polarity words decide the label: a fine-tuned model gets the dev set right, before and after W8A8.
    assert results["fp"] == {"validation": {"accuracy": 1.0}}
    assert results["quantized"] == {"validation": {"accuracy": 1.0}}
    assert results["eval_samples"] == {"validation": 12}
    assert results["calibration"] == {"split": "train", "num_samples": 8, "seed": 1}
    assert results["qlimit_config"]["method"] == "rtn" and results["qlimit_config"]["weight_bits"] == 8
    assert {"train_s", "fp_eval_s", "quantize_s", "save_s", "load_s", "quantized_eval_s"} <= set(results["timings_s"])
    assert (out / "fp_model" / "config.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "qlimit"
    assert saved["id2label"] == {"0": "negative", "1": "positive"}


def test_mrpc_metrics_match_an_independent_evaluation(run_glue, tmp_path):
    write_mrpc(tmp_path / "glue")
    dev = [
        line.split("\t") for line in (tmp_path / "glue/MRPC/dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:8]
    ]
    labels = np.array([int(row[0]) for row in dev])
    texts = [(row[3], row[4]) for row in dev]
    model = save_tiny_bert(tmp_path / "model", num_labels=2, balance_on=texts)
    out = tmp_path / "out"
    results = run_glue.main(
        _common(model, out, tmp_path / "glue", "mrpc") + ["--max_eval_samples", "7", "--act_bits", "none"]
    )

    for key, model_dir in (("fp", model), ("quantized", out)):
        preds = _predict(model_dir, texts).argmax(-1)
        assert 0 < preds.sum() < len(preds), "both classes should be predicted for this test to mean something"
        tp = int(((preds == 1) & (labels == 1)).sum())
        f1 = 2 * tp / (2 * tp + int((preds != labels).sum()))
        assert results[key]["validation"]["accuracy"] == pytest.approx(float((preds == labels).mean()))
        assert results[key]["validation"]["f1"] == pytest.approx(f1)
    assert results["eval_samples"] == {"validation": 7}
    assert results["calibration"]["num_samples"] == 8  # 8 of the 10 train rows
    assert results["qlimit_config"]["act_bits"] is None


def test_stsb_regression_calibrates_on_dev_with_warning(run_glue, tmp_path, caplog):
    write_stsb(tmp_path / "glue")
    model = save_tiny_bert(tmp_path / "model", num_labels=1)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        args = _common(model, out, tmp_path / "glue" / "STS-B", "stsb") + ["--num_samples", "32", "--act_bits", "none"]
        results = run_glue.main(args)

    assert "No train split: calibrating on" in caplog.text and "'validation' split" in caplog.text
    assert results["calibration"] == {"split": "validation", "num_samples": 10, "seed": 42}
    dev = [line.split("\t") for line in (tmp_path / "glue/STS-B/dev.tsv").read_text().splitlines()[1:]]
    scores = np.array([float(row[9]) for row in dev])
    preds = _predict(out, [(row[7], row[8]) for row in dev])[:, 0]
    assert results["quantized"]["validation"]["pearson"] == pytest.approx(pearsonr(preds, scores)[0], abs=1e-5)
    assert results["quantized"]["validation"]["spearmanr"] == pytest.approx(spearmanr(preds, scores)[0], abs=1e-5)
    assert set(results["fp"]["validation"]) == {"pearson", "spearmanr"}


def test_custom_csv_files_with_named_labels(run_glue, tmp_path):
    rows = _sentences(12, 5)
    for name, part in (("train", rows[:6]), ("dev", rows[6:])):
        lines = ["text,label"] + [f"{s},{'pos' if y else 'neg'}" for s, y in part]
        _write(tmp_path / f"{name}.csv", lines)
    texts = [(s,) for s, _ in rows[6:]]
    model = save_tiny_bert(tmp_path / "model", num_labels=2, balance_on=texts)
    out = tmp_path / "out"
    args = [
        "--model_name_or_path",
        str(model),
        "--train_file",
        str(tmp_path / "train.csv"),
        "--output_dir",
        str(out),
        "--validation_file",
        str(tmp_path / "dev.csv"),
        "--method",
        "rtn",
        "--weight_bits",
        "8",
        "--act_bits",
        "none",
        "--num_samples",
        "4",
        "--work_dir",
        str(tmp_path / "work"),
    ]
    results = run_glue.main(args)

    assert (tmp_path / "work" / "progress.json").is_file()  # quantize_qlimit got --work_dir
    preds = _predict(out, texts).argmax(-1)
    labels = np.array([y for _, y in rows[6:]])  # sorted label names: neg -> 0, pos -> 1
    assert results["quantized"] == {"validation": {"accuracy": pytest.approx(float((preds == labels).mean()))}}
    assert results["task"] is None and results["calibration"]["num_samples"] == 4
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_reader_handles_the_original_layouts(glue_data, tmp_path):
    # CoLA has no header; RTE and MNLI carry label names; MRPC starts with a BOM.
    _write(tmp_path / "CoLA/dev.tsv", ["gj04\t1\t\tThe sailors rode.", 'gj04\t0\t*\tRode the "sailors.'])
    cola = glue_data.read_glue_tsv(tmp_path / "CoLA/dev.tsv", "cola")
    assert cola.to_dict() == {"sentence": ["The sailors rode.", 'Rode the "sailors.'], "label": [1, 0]}
    _write(
        tmp_path / "rte.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tnot_entailment", "1\tc\td\tentailment"]
    )
    assert glue_data.read_glue_tsv(tmp_path / "rte.tsv", "rte")["label"] == [1, 0]
    write_mrpc(tmp_path, n_train=2, n_dev=3)
    mrpc = glue_data.read_glue_tsv(tmp_path / "MRPC/dev.tsv", "mrpc")
    assert mrpc.column_names == ["sentence1", "sentence2", "label"] and mrpc["label"] == [0, 1, 0]
    assert mrpc[0]["sentence1"].startswith('"')
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    for name in ("dev_matched", "dev_mismatched"):
        _write(tmp_path / f"MNLI/{name}.tsv", [header, "0\t1\t1e\tfic\tp\th\tneutral\tcontradiction", "1\tbroken"])
    mnli = glue_data.load_glue_dir(tmp_path, "mnli")
    assert list(mnli) == ["validation_matched", "validation_mismatched"]
    assert mnli["validation_matched"].to_dict() == {"premise": ["p"], "hypothesis": ["h"], "label": [2]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task_name", "sst5"], r"Unknown GLUE task 'sst5'; allowed values: \['cola', 'mnli'"),
        (["--task_name", "mrpc", "--data_dir", "{tmp}/glue"], r"expected .*/glue/MRPC/dev.tsv"),
        (["--task_name", "sst2", "--data_dir", "{tmp}/nowhere"], r"--data_dir .*/nowhere is not a directory"),
        (
            ["--train_file", "{tmp}/train.csv", "--validation_file", "{tmp}/dev.csv"],
            r"train file .*/train.csv does not",
        ),
        (["--task_name", "sst2", "--data_dir", "{tmp}/glue", "--act_bits", "six"], r"--act_bits must be an integer"),
        (["--task_name", "sst2", "--data_dir", "{tmp}/glue", "--method", "gptq"], r"`method` must be one of"),
        (["--data_dir", "{tmp}/glue"], r"--data_dir needs --task_name"),
    ],
)
def test_clear_errors(run_glue, tmp_path, extra, message):
    write_sst2(tmp_path / "glue", n_train=4, n_dev=2)
    args = ["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=message):
        run_glue.main(args + [a.format(tmp=tmp_path) for a in extra])


@pytest.fixture(scope="module")
def glue_metric(run_glue):
    import evaluate

    return lambda task: evaluate.load(run_glue.glue_metric_path(), config_name=task, keep_in_memory=True)


def test_glue_metric_values(glue_metric):
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert glue_metric("mrpc").compute(predictions=preds, references=refs) == pytest.approx(
        {"accuracy": 0.6, "f1": 2 / 3}
    )
    assert glue_metric("qnli").compute(predictions=preds, references=refs) == {"accuracy": 0.6}
    # Matthews: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 1 / 6
    assert glue_metric("cola").compute(predictions=preds, references=refs) == pytest.approx(
        {"matthews_correlation": 1 / 6}
    )
    stsb = glue_metric("stsb").compute(predictions=[1.0, 2.0, 3.0, 4.0], references=[1.0, 2.0, 3.0, 5.0])
    assert stsb["spearmanr"] == pytest.approx(1.0) and stsb["pearson"] == pytest.approx(0.9827076, abs=1e-6)
    with pytest.raises(ValueError, match="allowed"):
        glue_metric("sst5")


@pytest.mark.slow
def test_glue_metric_loads_offline(run_glue):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    code = (
        "import evaluate, sys; m = evaluate.load(sys.argv[1], config_name='sst2');"
        "print(m.compute(predictions=[0, 1, 1], references=[0, 1, 0])['accuracy'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, run_glue.glue_metric_path()],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(2 / 3)
