"""GLUE metric as an `evaluate` module shipped with hf_qlimit, so evaluation works without the Hub.

Computes what the official `glue` metric of `evaluate` computes for each task (same names, same formulas):
Matthews correlation for CoLA, Pearson and Spearman correlation for STS-B, accuracy and binary F1 for MRPC
and QQP, accuracy for every other task.

    metric = evaluate.load(str(Path(hf_qlimit.__file__).parent / "metrics/glue/glue.py"), config_name="mrpc")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.666..., 'f1': 0.666...}
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
The metric of each task of GLUE, the General Language Understanding Evaluation benchmark
(https://gluebenchmark.com/): accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (integers), or predicted scores (floats) for `stsb`.
    references: gold class ids, or gold scores for `stsb`.
Returns, by task (the config name):
    cola: {"matthews_correlation"}
    stsb: {"pearson", "spearmanr"}
    mrpc, qqp: {"accuracy", "f1"} (F1 of the positive class 1)
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans: {"accuracy"}
Example:
    >>> metric = evaluate.load("glue.py", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
ACCURACY_F1_TASKS = ("mrpc", "qqp")
TASKS = ("cola", "stsb", *ACCURACY_F1_TASKS, *ACCURACY_TASKS)


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float((predictions == references).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASKS:
            raise ValueError(f"Unknown GLUE task {self.config_name!r} for the glue metric; allowed: {list(TASKS)}.")
        # STS-B is a regression task: its scores are floats, every other task has class ids.
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        task = self.config_name
        if task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if task == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        accuracy = _accuracy(predictions, references)
        if task in ACCURACY_F1_TASKS:
            return {"accuracy": accuracy, "f1": float(f1_score(y_true=references, y_pred=predictions))}
        return {"accuracy": accuracy}
