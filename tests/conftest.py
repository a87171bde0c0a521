"""Fixtures and session settings. The tiny models and calibration sets the tests build are in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB

import hf_qlimit  # noqa: F401  (registers the quantizer)

# Tiny models gain nothing from threads, and spinning threads on a shared CPU slow every op down.
torch.set_num_threads(1)


@pytest.fixture
def inputs() -> torch.Tensor:
    """A (4, 12) batch of token ids below `helpers.VOCAB`."""
    return torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
