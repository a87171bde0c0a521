"""Tiny random models of 25 Transformers families, built offline, for the any-model matrix (issue #30).

- `build(model_type, seed=0)`: a seeded fp32 model in eval mode with eager attention: decoders with a causal LM
  head, encoders (and `albert`) with a 2-label sequence classification head, `t5` as T5ForConditionalGeneration.
- `ZOO`: model type -> zero-argument builder; `DECODERS`, `ENCODERS`, `ENCODER_DECODERS`: the matrix's types;
  `SHARED_LAYER = ("albert",)` (one layer called N times) is kept out of the matrix.
- `BLOCKS`: each type's block stacks; `projection_matrices(model, model_type)`: the projections in them.
- `calib(model_type, n, length, seed)`: unpadded samples (token id lists of varying lengths) the model accepts.
- `eval_batch(model_type)`: a padded batch; `logits(model, batch)`; `outputs(model, batch)` (logits, and a
  classifier's last hidden states); `relative_logit_error(a, b)`.

Every model has hidden size 32, 4 heads of 8 (2 KV heads where the family has grouped-query attention),
intermediate 64 (MoE: 4 experts of 32, top 2), vocabulary `VOCAB` with pad/bos/eos = 0/1/2 and 64 positions, so a
group size of 32 divides every projection's input features. gemma2, gemma3_text and modernbert have 3 layers
alternating sliding and global attention; the others 2.

Random init draws weights with std 0.02 and norms at 1 (0 for Gemma's 1+w): attention is then almost uniform and
rotary or mask arguments barely matter, so a test could not see them broken. `_spread` redraws every projection
with std 0.15 (about 1/sqrt(fan-in)) and norms in [0.5, 1.5].

Quirks (transformers 5.25):
- gemma2's attention softcap is 1 (dropping it moves the logits by 0.22; at the default 50, by 2e-4).
- Gemma's head_dim defaults to 256 and ModernBERT's special ids are ~50k (beyond the vocabulary): set here.
- RoBERTa counts positions from pad_token_id + 1, hence 2 extra position embeddings.
- gemma3_text alternates rotary tables too (rope_parameters per layer type: theta 1e4 sliding, 1e6 global);
  modernbert's layers are global, local, global (global_attn_every_n_layers=2; local_attention 4 = a window of
  2 each side), with theta 160000 / 10000.
- deberta-v2 is built DeBERTa-v3 style (relative attention, p2c/c2p, shared keys, 16 position buckets).
- falcon is Falcon-7B style: multi-query attention, one fused qkv, one norm feeding attention and MLP in
  parallel, rotary (not alibi).
- t5 is v1.1 style (gated-gelu, untied head); its decoder starts from the pad token (0). Its position bias is
  redrawn with std 1 (init: 0.18), else dropping it would move the logits by less than W8A8 does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

VOCAB = 128
FIRST_ID = 3  # calibration ids avoid pad/bos/eos (0/1/2)
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
_BERT_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
_SLIDING3 = ["sliding_attention", "full_attention", "sliding_attention"]
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}

# model type -> config fields beyond SPECIAL and the vocabulary
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 8},
    "qwen3_moe": {**_LLAMA_LIKE, "head_dim": 8, "moe_intermediate_size": 32, "num_experts": 4, **_MOE},
    "mistral": {**_LLAMA_LIKE, "head_dim": 8},
    "mixtral": {**_LLAMA_LIKE, "head_dim": 8, "intermediate_size": 32, **_MOE},
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "gemma2": {
        **_LLAMA_LIKE,
        "head_dim": 8,
        "num_hidden_layers": 3,
        "layer_types": _SLIDING3,
        "sliding_window": 4,
        "query_pre_attn_scalar": 8,
        "attn_logit_softcapping": 1.0,  # 50 leaves these scores alone: a dropped softcap would not show
    },
    "gemma3_text": {
        **_LLAMA_LIKE,
        "head_dim": 8,
        "num_hidden_layers": 3,
        "layer_types": _SLIDING3,
        "sliding_window": 4,
        "query_pre_attn_scalar": 8,
    },
    "phi": {**_LLAMA_LIKE, "num_key_value_heads": 4},  # partial rotary (half of each head)
    "phi3": _LLAMA_LIKE,
    "gpt2": {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt_neox": _BERT_LIKE,
    "falcon": {**_BERT_LIKE, "ffn_hidden_size": 64, "multi_query": True, "parallel_attn": True, "alibi": False},
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "opt": {
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
    },
    "bert": _BERT_LIKE,
    "roberta": {**_BERT_LIKE, "max_position_embeddings": 66},
    "distilbert": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64},
    "electra": {**_BERT_LIKE, "embedding_size": 32},
    "deberta-v2": {
        **_BERT_LIKE,
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 16,
        "max_relative_positions": -1,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "position_biased_input": False,
    },
    "modernbert": {
        **_BERT_LIKE,
        "num_hidden_layers": 3,
        "global_attn_every_n_layers": 2,
        "local_attention": 4,
        "cls_token_id": 1,
        "sep_token_id": 2,
    },
    "t5": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
    },
    "bart": {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 64,
        "decoder_start_token_id": 2,
    },
    "albert": {**_BERT_LIKE, "embedding_size": 32},
}

DECODERS = (
    "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "gpt_neox", "falcon", "olmo2", "granite", "opt",
)  # fmt: skip
ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert")
ENCODER_DECODERS = ("t5", "bart")
SHARED_LAYER = ("albert",)
MATRIX = DECODERS + ENCODERS + ENCODER_DECODERS


def _own_attention() -> tuple[str, ...]:
    """The types whose attention does not go through transformers' attention interface: DeBERTa-v2, and Falcon
    before transformers 5.25 (5.23's modeling_falcon has no ALL_ATTENTION_FUNCTIONS)."""
    from transformers.models.falcon import modeling_falcon

    return ("deberta-v2",) + (() if hasattr(modeling_falcon, "ALL_ATTENTION_FUNCTIONS") else ("falcon",))


# hf_qlimit refuses to quantize their attention matmuls: settings with activations leave those in full precision.
OWN_ATTENTION = _own_attention()


# Where each type's blocks are, written out rather than found, so that tests do not trust hf_qlimit's discovery.
BLOCKS: dict[str, tuple[str, ...]] = {
    **{t: ("model.layers",) for t in DECODERS},
    "gpt2": ("transformer.h",),
    "falcon": ("transformer.h",),
    "gpt_neox": ("gpt_neox.layers",),
    "opt": ("model.decoder.layers",),
    "bert": ("bert.encoder.layer",),
    "roberta": ("roberta.encoder.layer",),
    "distilbert": ("distilbert.transformer.layer",),
    "electra": ("electra.encoder.layer",),
    "deberta-v2": ("deberta.encoder.layer",),
    "modernbert": ("model.layers",),
    "t5": ("encoder.block", "decoder.block"),
    "bart": ("model.encoder.layers", "model.decoder.layers"),
}


def in_blocks(model: nn.Module, model_type: str) -> Iterator[tuple[str, nn.Module]]:
    prefixes = tuple(p + "." for p in BLOCKS[model_type])
    return ((n, m) for n, m in model.named_modules() if n.startswith(prefixes))


def own_matrices(module: nn.Module) -> int:
    """Projection matrices a module owns: 1 for a Linear (subclasses too) or a Conv1D, else one per expert of its
    3-D parameters (fused MoE experts). A router's 2-D weight outside a Linear is not a projection."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return 1
    return sum(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)


def projection_matrices(model: nn.Module, model_type: str) -> dict[str, int]:
    """Module name -> projection matrices it owns, in the blocks of an FP model."""
    return {n: k for n, m in in_blocks(model, model_type) if (k := own_matrices(m))}


def auto_class(model_type: str) -> type:
    """The Auto class that builds and reloads `model_type`."""
    if model_type in ENCODER_DECODERS:
        return AutoModelForSeq2SeqLM
    if model_type in DECODERS:
        return AutoModelForCausalLM
    return AutoModelForSequenceClassification


def config(model_type: str) -> Any:
    extra = {"num_labels": 2} if auto_class(model_type) is AutoModelForSequenceClassification else {}
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **SPECIAL, **CONFIGS[model_type], **extra)


@torch.no_grad()
def _spread(model: nn.Module, seed: int) -> None:
    """Projections (2-D and 3-D expert weights outside embeddings) ~ N(0, 0.15); norm scales in [0.5, 1.5];
    T5's relative position bias ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if id(p) in embeddings:
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif is_norm and name == "weight":
                gemma = "gemma" in type(module).__name__.lower()  # (1 + w): w in [-0.5, 0.5]
                p.copy_(torch.rand(p.shape, generator=g) - (0.5 if gemma else -0.5))
    for name, module in model.named_modules():  # T5's position bias, in units of scores as trained T5's
        if name.endswith("relative_attention_bias"):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g))


def build(model_type: str, seed: int = 0) -> nn.Module:
    """A seeded tiny fp32 `model_type` model in eval mode with eager attention."""
    torch.manual_seed(seed)
    model = auto_class(model_type).from_config(config(model_type), attn_implementation="eager")
    _spread(model, seed)
    return model.float().eval()


ZOO: dict[str, Callable[[], nn.Module]] = {t: partial(build, t) for t in MATRIX + SHARED_LAYER}


def calib(model_type: str, n: int = 8, length: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` unpadded samples of `length // 2` to `length` token ids in [FIRST_ID, VOCAB) (the same for every type:
    the encoder of t5 takes them as its input)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(length // 2, 1), length + 1, (n,), generator=g)
    return [{"input_ids": torch.randint(FIRST_ID, VOCAB, (int(k),), generator=g).tolist()} for k in lengths]


def eval_batch(model_type: str, batch: int = 4, length: int = 12, seed: int = 7) -> dict[str, torch.Tensor]:
    """A right-padded batch (row r is 3r tokens short) with its mask; t5 also gets `decoder_input_ids`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ID, VOCAB, (batch, length), generator=g)
    mask = (torch.arange(length) < (length - 3 * torch.arange(batch))[:, None]).long()
    ids[mask == 0] = SPECIAL["pad_token_id"]
    out = {"input_ids": ids, "attention_mask": mask}
    if model_type in ENCODER_DECODERS:
        dec = torch.randint(FIRST_ID, VOCAB, (batch, length // 2), generator=g)
        out["decoder_input_ids"] = torch.cat([torch.zeros(batch, 1, dtype=torch.long), dec[:, :-1]], 1)
    return out


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (of a causal LM: at the unpadded positions, the others are arbitrary), without autograd."""
    with torch.no_grad():
        out = model(**batch).logits
    if out.dim() == 3 and "decoder_input_ids" not in batch:
        out = out[batch["attention_mask"].bool()]
    return out


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What to compare with FP: `logits`, plus for a classifier the last hidden states at the unpadded positions
    (2 logits read one token: a broken mask or position could hide there)."""
    if auto_class(model.config.model_type) is not AutoModelForSequenceClassification:
        return logits(model, batch)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1][batch["attention_mask"].bool()].flatten()])


def relative_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: `b` is the reference."""
    return float((a - b).norm() / b.norm())
