"""Quantization gives, bit for bit, what it gave at commit cc65be4 on 18 tiny configs
(tests/fixtures/make_golden_outputs.py says how to regenerate them when a change is meant to alter them)."""

from __future__ import annotations

import pytest
import torch
from fixtures.make_golden_outputs import CASES, OUT, run
from safetensors.torch import load_file


@pytest.mark.parametrize("name", sorted(CASES))
def test_quantization_output_is_unchanged(name):
    expected = load_file(str(OUT / f"{name}.safetensors"))
    got = run(name)
    assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differing, f"{name}: {len(differing)} tensors differ from the golden outputs, first {differing[:5]}"
