"""Tiny random models and calibration sets the tests build: no downloads, seconds on a CPU.

Test modules import them as `from helpers import ...` (pytest puts tests/, the folder of the root conftest.py,
on sys.path). Fixtures live in conftest.py.

- `tiny_bert()`, `tiny_opt()`: BERT classifier and OPT LM, vocabulary `VOCAB`; `MODELS` maps "bert"/"opt" to them.
- `tiny_decoder(kind)`: a Llama, Qwen2, Mistral (grouped-query attention) or OPT decoder, vocabulary
  `DECODER_VOCAB`, tied embeddings unless `tie=False`; `TINY` maps "bert"/"opt"/"llama" to a builder.
- `calib_samples()`: variable-length samples (token id lists, a label) for BERT/OPT;
  `decoder_calib()`: fixed-length id tensors for `tiny_decoder`; `calib_all_models()`: samples every model takes.
- `logits(model, ids)`: the logits without autograd.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 120  # tiny_bert, tiny_opt, calib_samples
DECODER_VOCAB = 96  # tiny_decoder, decoder_calib
_DECODER = {
    "vocab_size": DECODER_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
_DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    return OPTForCausalLM(config).eval()


def tiny_decoder(kind: str, seed: int = 0, tie: bool = True):
    """A 2-layer decoder: "llama", "qwen2", "mistral" (4 query heads over 2 KV heads, norms spread over
    [0.5, 1.5] so quantization shows) or "opt" (not `tiny_opt`: this one has `DECODER_VOCAB`)."""
    torch.manual_seed(seed)
    if kind == "opt":
        config = OPTConfig(
            vocab_size=DECODER_VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
        )
        return OPTForCausalLM(config).eval()
    config_cls, model_cls = _DECODERS[kind]
    model = model_cls(config_cls(**_DECODER, tie_word_embeddings=tie)).eval()
    with torch.no_grad():  # random init leaves norms at 1 and small weights: spread them so quantization shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


MODELS = {"bert": tiny_bert, "opt": tiny_opt}
TINY = {"bert": tiny_bert, "opt": tiny_opt, "llama": lambda: tiny_decoder("llama")}
AUTO = {"bert": AutoModelForSequenceClassification, "opt": AutoModelForCausalLM, "llama": AutoModelForCausalLM}


def calib_samples(n: int = 16, seed: int = 1, min_len: int = 5, max_len: int = 20) -> list[dict]:
    """`n` samples of 5 to 19 token ids below `VOCAB` (lists, as a tokenized dataset gives them), label 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len, (n,), generator=g)
    return [{"input_ids": torch.randint(3, VOCAB, (int(n_),), generator=g).tolist(), "label": 0} for n_ in lengths]


def decoder_calib(n: int = 8, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` samples of `length` token ids below `DECODER_VOCAB` (tensors)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, DECODER_VOCAB, (length,), generator=g)} for _ in range(n)]


def calib_all_models() -> list[dict]:
    """`calib_samples()` with the ids taken modulo `DECODER_VOCAB` and no label: valid for every model in `TINY`."""
    return [{"input_ids": [i % DECODER_VOCAB for i in s["input_ids"]]} for s in calib_samples()]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# The activation defaults before issue 32 (static grids per Linear, attention matmuls quantized on a searched
# range, no rotation). The tests of those mechanisms set them: the defaults now rotate at 4-bit activations, and
# decoders get per-token inputs, the FFN down rotation and FP matmuls.
STATIC_ACTIVATIONS = {
    "quantize_attention": True,
    "act_dynamic": False,
    "transforms": [],
    "act_layout": "per_linear",
    "prob_grid": "uniform",
}
