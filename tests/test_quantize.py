"""quantize -> save -> reload, the packed format, and the errors of the entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import MODELS, calib_samples, logits, tiny_bert, tiny_opt
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit.nn.modules import QuantLinear

AUTO = {"bert": AutoModelForSequenceClassification, "opt": AutoModelForCausalLM}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_reload_in_fresh_process_gives_identical_outputs(arch, inputs, tmp_path):
    model = MODELS[arch]()
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=4, act_bits=8, method="rtn", batch_size=8))
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "q")
    torch.save({"inputs": inputs}, tmp_path / "inputs.pt")  # test-only fixture; the checkpoint has no pickle
    script = textwrap.dedent(f"""
        import torch, hf_qlimit
        from transformers import {AUTO[arch].__name__} as Auto
        model = Auto.from_pretrained({str(tmp_path / "q")!r})
        ids = torch.load({str(tmp_path / "inputs.pt")!r})["inputs"]
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_roberta_round_trip(inputs, tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=130,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=70,
        pad_token_id=1,
    )
    model = RobertaForSequenceClassification(config).eval()
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=4, act_bits=8, method="brecq", iters=5))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_checkpoint_is_packed_safetensors(tmp_path):
    model = tiny_bert()
    fp_bytes = model.bert.encoder.layer[0].intermediate.dense.weight.numel() * 4
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=4, act_bits=8, method="rtn"))
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qlimit"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        packed = f.get_tensor("bert.encoder.layer.0.intermediate.dense.weight")
        assert packed.dtype == torch.uint8
        assert packed.numel() == fp_bytes / 4 / 2  # 4 bits: two codes per byte, 1/8 of the fp32 bytes
        assert f.get_tensor("bert.encoder.layer.0.intermediate.dense.weight_quantizer.scale").shape == (64, 1)
        assert f.get_tensor("bert.encoder.layer.0.intermediate.dense.input_quantizer.scale").numel() == 1
        assert f.get_tensor("bert.encoder.layer.0.attention.self.qlimit_attention.probs.scale").numel() == 1
        classifier = f.get_tensor("classifier.weight")  # the last layer stays at 8 bits by default
        assert classifier.numel() == model.classifier.rows * model.classifier.cols


def test_group_size_and_weight_only_round_trip(inputs, tmp_path):
    model = tiny_opt()
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=3, act_bits=None, group_size=16, method="rtn"))
    layer = model.model.decoder.layers[0].fc1
    assert layer.input_quantizer is None and layer.weight_quantizer.scale.shape == (64, 2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_weights_lie_on_the_integer_grid():
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=2, act_bits=8, method="rtn", transforms=[]))
    layer: QuantLinear = model.bert.encoder.layer[1].output.dense
    w = layer.quantized_weight()
    q = w / layer.weight_quantizer.scale + layer.weight_quantizer.zero.float()
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().min() >= 0 and q.round().max() <= 3


def test_w8a8_stays_close_while_w2a8_degrades(inputs):
    def hidden(model):
        with torch.no_grad():
            return model.bert(input_ids=inputs).last_hidden_state

    fp = hidden(tiny_bert())
    errors = {}
    for bits in (8, 2):
        model = tiny_bert()
        # Embeddings in FP: in a random-init BERT they dominate the residual stream and would mask the blocks.
        config = QLimitConfig(weight_bits=bits, act_bits=8, first_last_bits=None, method="rtn")
        model.quantize_qlimit(calib_samples(32), config)
        errors[bits] = ((hidden(model) - fp).norm() / fp.norm()).item()
    assert errors[8] < 0.02
    assert errors[2] > 5 * errors[8]


def test_calibration_accepts_a_datasets_dataset():
    from datasets import Dataset

    ds = Dataset.from_list(calib_samples(8))
    model = tiny_bert()
    hf_qlimit.quantize(model, ds, QLimitConfig(method="rtn"))
    assert model.is_quantized and model.config.quantization_config.layer_config


def test_empty_calibration_set_is_an_error():
    with pytest.raises(ValueError, match="calibration set is empty"):
        tiny_bert().quantize_qlimit([], QLimitConfig(method="rtn"))


def test_wrong_columns_are_an_error():
    with pytest.raises(ValueError, match="input_ids"):
        tiny_bert().quantize_qlimit([{"sentence": "hello"}], QLimitConfig(method="rtn"))


def test_a_model_without_transformer_blocks_is_refused():
    """Architectures are found from the model (any type with a stack of blocks works: tests/test_any_model.py);
    one with no stack of identical layers is refused with a message saying what hf_qlimit looks for."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_bert().config
            self.proj = nn.Linear(32, 32)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return self.proj(torch.zeros(*input_ids.shape, 32))

    with pytest.raises(ValueError, match="found no transformer blocks"):
        hf_qlimit.quantize(Bag(), calib_samples(), QLimitConfig(method="rtn"))


def test_nan_activations_are_an_error():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))


def test_quantizing_twice_is_an_error():
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))


@pytest.mark.slow
def test_loading_without_hf_qlimit_fails_loudly(tmp_path):
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))
    model.save_pretrained(tmp_path)
    script = f"from transformers import AutoModelForSequenceClassification as A; A.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "qlimit" in result.stderr and "mismatch" in result.stderr.lower()


def test_corrupt_checkpoint_is_an_error(tmp_path):
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["layer_config"]["bert.encoder.layer.0.intermediate.dense"]["w"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_checkpoint_missing_quantized_tensors_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.input_quantizer.scale"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 quantized tensors"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_a_failed_quantization_cannot_be_saved(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.quantize_qlimit(calib_samples(), QLimitConfig(method="rtn"))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("frozen", [False, True])
def test_embedding_lookup_quantizes_only_the_rows_it_needs(frozen):
    from torch import nn

    from hf_qlimit.nn.embedding import QuantEmbedding

    emb = QuantEmbedding.from_embedding(nn.Embedding(50, 16), {"w": 4}, weight_sym=False)
    emb.weight_quantizer.init_range(emb.weight, 2.4)
    if frozen:
        emb.freeze()
    ids = torch.tensor([[3, 7, 7], [0, 49, 12]])
    full = torch.nn.functional.embedding(ids, emb.quantized_weight())  # the whole table, then the lookup
    emb.set_inference_mode("dequantize")  # the row path
    assert torch.equal(emb(ids), full)


def test_large_frozen_linear_without_cache_runs_in_slabs(monkeypatch):
    from torch import nn

    from hf_qlimit.nn.modules import QuantLinear
    from hf_qlimit.quantizers import chunks

    layer = QuantLinear.from_linear(nn.Linear(16, 40), {"w": 4, "a": None}, None, False, False)
    layer.weight_quantizer.init_range(layer.weight, 2.4)
    layer.freeze()
    x = torch.randn(3, 5, 16)
    full = layer(x)  # one dequantized matrix
    layer.set_inference_mode("dequantize")
    monkeypatch.setattr(chunks, "ROW_CHUNK", 16 * 7)  # slabs of 7 output rows: 6 slabs, the last one short
    slabs = []
    dequantize_rows = layer.dequantize_rows
    monkeypatch.setattr(layer, "dequantize_rows", lambda rows=None: slabs.append(rows) or dequantize_rows(rows))
    torch.testing.assert_close(layer(x), full)
    assert [(s.start, s.stop) for s in slabs] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 40)]
    assert layer._dequantized is None
