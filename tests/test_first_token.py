"""act_fp_first_token: the attention sink (position 0) skips activation quantization in decoder blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import DECODER_VOCAB, STATIC_ACTIVATIONS, decoder_calib, tiny_bert, tiny_decoder
from transformers import AutoModelForCausalLM

import hf_qlimit
from hf_qlimit import QLimitConfig

# weights alike in every variant (RTN), head and embeddings FP: only the activations differ
BASE = {
    "weight_bits": 4,
    "method": "rtn",
    "num_samples": 8,
    "batch_size": 4,
    "first_last_bits": None,
    **STATIC_ACTIVATIONS,
}


def _quantized(kind: str = "llama", **kwargs):
    model = tiny_decoder(kind)
    model.quantize_qlimit(decoder_calib(), QLimitConfig(**{**BASE, **kwargs}))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, DECODER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("attention", [False, True])
def test_first_token_is_computed_in_full_precision(kind, attention):
    """Position 0 attends to itself alone: with its Linear inputs, query, key and value in FP (and probabilities
    on the log2 grid, where its 1.0 is exact) its logits are the weight-only model's."""
    ids = _ids()
    weight_only = _quantized(kind, act_bits=None)
    hf_qlimit.set_inference_mode(weight_only, "dequantize")  # the same float matmuls as the others, not int4's
    weight_only = weight_only(input_ids=ids).logits
    acts = {"act_bits": 4, "quantize_attention": attention, "prob_grid": "log2"}
    kept = _quantized(kind, **acts, act_fp_first_token=True)(input_ids=ids).logits
    plain = _quantized(kind, **acts)(input_ids=ids).logits
    torch.testing.assert_close(kept[:, 0], weight_only[:, 0], rtol=1e-4, atol=1e-4)
    assert (plain[:, 0] - weight_only[:, 0]).abs().max() > 1e-2  # without the option it is quantized
    assert (kept[:, 1:] - weight_only[:, 1:]).abs().max() > 1e-2  # the other tokens are


@torch.no_grad()
def test_grids_are_fitted_without_the_first_token():
    def down_scale(outlier: bool, keep_first: bool) -> float:
        model = tiny_decoder("llama")
        if outlier:  # a huge first-token input of layer 0's down_proj, as SmolLM2 has at its attention sink
            model.model.layers[0].mlp.act_fn.register_forward_hook(
                lambda m, a, out: torch.cat([out[:, :1] * 1000, out[:, 1:]], 1)
            )
        model.quantize_qlimit(decoder_calib(), QLimitConfig(**BASE, act_bits=8, act_fp_first_token=keep_first))
        return model.model.layers[0].mlp.down_proj.input_quantizer.scale.item()

    reference = down_scale(outlier=False, keep_first=True)
    assert down_scale(outlier=True, keep_first=True) == pytest.approx(reference, rel=1e-3)  # the sink moved nothing
    assert down_scale(outlier=True, keep_first=False) > 10 * reference  # without the option it sets the grid


@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(tmp_path):
    """Decoding with a KV cache keeps the cache's first entry (position 0) in FP and quantizes the new token, as
    the full forward does; the option survives save -> reload."""
    model = _quantized(act_bits=4, act_fp_first_token=True)
    ids = _ids()
    full = model(input_ids=ids).logits[:, -1]
    prefill = model(input_ids=ids[:, :-1], use_cache=True)
    step = model(input_ids=ids[:, -1:], cache=prefill.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.act_fp_first_token
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_encoders_are_refused():
    with pytest.raises(ValueError, match="act_fp_first_token.*decoder"):
        tiny_bert().quantize_qlimit(decoder_calib(), QLimitConfig(**BASE, act_bits=8, act_fp_first_token=True))
