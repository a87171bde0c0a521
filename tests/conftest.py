"""Tiny random models and calibration data built in the tests: no downloads, seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, OPTConfig, OPTForCausalLM

import hf_qlimit  # noqa: F401  (registers the quantizer)

VOCAB = 120
# Tiny models gain nothing from threads, and spinning threads on a shared CPU slow every op down.
torch.set_num_threads(1)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(config).eval()


def calib_samples(n: int = 16, seed: int = 1, min_len: int = 5, max_len: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len, (n,), generator=g)
    return [{"input_ids": torch.randint(3, VOCAB, (int(n_),), generator=g).tolist(), "label": 0} for n_ in lengths]


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))


MODELS = {"bert": tiny_bert, "opt": tiny_opt}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
