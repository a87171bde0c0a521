"""Checkpoints saved by hf_qlimit before the [layout] refactor (tests/fixtures/legacy, written by
tests/fixtures/make_legacy_checkpoints.py at commit cc65be4) load and compute exactly what they did then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_qlimit  # noqa: F401  (registers the quantizer)

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
CASES = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


def test_the_fixtures_are_there():
    assert len(CASES) == 4, CASES


@pytest.mark.parametrize("name", CASES)
def test_legacy_checkpoint_loads_bit_exactly(name):
    folder = LEGACY / name
    auto = AutoModelForCausalLM if name.startswith("llama") else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder)
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
