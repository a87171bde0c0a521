"""`QLimitConfig(weight_format="gguf:...")`: every quantized module on its GGUF type's grid, saved and reloaded."""

from __future__ import annotations

import pytest
import torch
from helpers import decoder_calib, logits, tiny_decoder

import hf_qlimit  # noqa: F401
from hf_qlimit import QLimitConfig


def _grid(module) -> tuple[int, int | None, bool]:
    q = module.weight_quantizer
    return q.bits, q.group_size, q.symmetric


@pytest.mark.parametrize(
    "fmt, grid", [("gguf:q4_0", (4, 32, True)), ("gguf:q4_1", (4, 32, False)), ("gguf:q5_0", (5, 32, True))]
)
def test_blocks_take_the_format_and_the_embedding_and_head_take_q8_0(fmt, grid, tmp_path):
    model = tiny_decoder("llama")
    config = QLimitConfig(weight_format=fmt, method="rtn", module_bits={"*.down_proj": 8})
    model.quantize_qlimit(decoder_calib(4), config)
    layers = model.config.quantization_config.layer_config
    assert layers["model.layers.0.self_attn.q_proj"]["format"] == fmt
    assert _grid(model.model.layers[0].self_attn.q_proj) == grid
    # embedding and head at first_last_bits=8 -> Q8_0; a module_bits entry -> the GGUF type of its bits
    for module in (model.model.embed_tokens, model.lm_head, model.model.layers[1].mlp.down_proj):
        assert _grid(module) == (8, 32, True)
    assert layers["lm_head"]["format"] == layers["model.layers.1.mlp.down_proj"]["format"] == "gguf:q8_0"
    ids = decoder_calib(1)[0]["input_ids"].unsqueeze(0)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert _grid(reloaded.model.layers[0].self_attn.q_proj) == grid
    assert torch.equal(logits(reloaded, ids), expected)


def test_a_setting_that_contradicts_the_format_is_refused():
    with pytest.raises(ValueError, match=r"contradicts weight_bits=3 \(gguf:q4_0 is 4-bit\)"):
        QLimitConfig(weight_format="gguf:q4_0", weight_bits=3)
    with pytest.raises(ValueError, match="group_size=128"):
        QLimitConfig(weight_format="gguf:q4_1", group_size=128)
    with pytest.raises(ValueError, match="first_last_bits=7"):
        QLimitConfig(weight_format="gguf:q8_0", first_last_bits=7)
    with pytest.raises(ValueError, match="must be one of"):
        QLimitConfig(weight_format="q4_0")
    config = QLimitConfig(weight_format="gguf:q8_0")
    assert (config.weight_bits, config.group_size, config.weight_sym, config.act_bits) == (8, 32, True, None)
    assert "on gguf:q8_0's grid" in config.summary()


def test_rows_that_do_not_split_into_the_formats_blocks_are_refused_with_the_fix():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_qlimit.models import get_adapter

    sizes = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, **sizes))
    config = QLimitConfig(weight_format="gguf:q4_0", first_last_bits=None)
    with pytest.raises(ValueError, match=r"q_proj' has rows of 48 weights, .* gguf:q4_0's blocks of 32\. Keep it"):
        get_adapter(model).layer_config(model, config)
