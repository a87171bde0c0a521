"""Export to compressed-tensors: the folder loads in plain transformers, in a process that never imports hf_qlimit,
and gives the fake-quantized model's logits; what the format cannot express is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import STATIC_ACTIVATIONS, calib_samples, decoder_calib, tiny_bert, tiny_decoder

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.quant_state import quant_state
from hf_qlimit.export import ExportError

needs_ct = pytest.mark.skipif(
    __import__("importlib").util.find_spec("compressed_tensors") is None,
    reason="the `compressed-tensors` package is not installed (pip install compressed-tensors)",
)
# float32 on both sides, the same codes and scales: only the summation order may differ
LOGIT_RTOL = 1e-5


def _config(**overrides) -> QLimitConfig:
    base = {"weight_bits": 4, "act_bits": None, "group_size": 16, "method": "rtn", "num_samples": 8, "batch_size": 4}
    base.update(STATIC_ACTIVATIONS)
    return QLimitConfig(**{**base, **overrides})


def _llama(**overrides):
    return tiny_decoder("llama").quantize_qlimit(decoder_calib(8), _config(**overrides))


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(5))


def _reference(model) -> torch.Tensor:
    hf_qlimit.set_inference_mode(model, "dequantize")  # exact fake quantization
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _load_elsewhere(folders: list[Path], auto_class: str, tmp_path: Path) -> list[torch.Tensor]:
    """Logits of each exported folder, loaded by plain transformers in a fresh process without hf_qlimit."""
    torch.save(_ids(), tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        for i, folder in enumerate({[str(f) for f in folders]!r}):
            model = getattr(transformers, {auto_class!r}).from_pretrained(folder).eval()
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(tmp_path)!r} + f"/logits{{i}}.pt")
        assert "hf_qlimit" not in sys.modules, "the export must load without hf_qlimit"
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(tmp_path / f"logits{i}.pt") for i in range(len(folders))]


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    error = (got - expected).abs().max() / expected.abs().max()
    assert error <= LOGIT_RTOL, f"relative error {error:.2e}"


@pytest.mark.slow
@needs_ct
def test_weight_only_and_w8a8_load_without_hf_qlimit(tmp_path):
    w4 = _llama()  # asymmetric W4 g16, 8-bit head: pack-quantized
    w3 = _llama(weight_bits=3, weight_sym=True)  # symmetric low bits: served by vLLM too
    w8a8 = _llama(weight_bits=8, act_bits=8, group_size=None, quantize_attention=False, act_dynamic=False)
    # per-token input grids at run time (the decoder default): the format's dynamic "token" strategy
    dynamic = _llama(weight_bits=8, act_bits=8, group_size=None, quantize_attention=False, act_dynamic=True)
    models = {"w4": w4, "w3": w3, "w8a8": w8a8, "dynamic": dynamic}
    refs = {name: _reference(model) for name, model in models.items()}
    folders = []
    for name, model in models.items():
        folders.append(hf_qlimit.export(model, tmp_path / name))
    config = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["dequantize"] is True
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert (
        json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    )
    groups = json.loads((tmp_path / "dynamic" / "config.json").read_text())["quantization_config"]["config_groups"]
    acts = groups["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["strategy"], acts["dynamic"]) == (8, "token", True)
    for (name, ref), got in zip(refs.items(), _load_elsewhere(folders, "AutoModelForCausalLM", tmp_path)):
        _assert_close(got, ref)
    # the reloaded W8A8 models really quantize their inputs: without them the logits are others
    for name in ("w8a8", "dynamic"):
        with quant_state(models[name], weights=True, acts=False), torch.no_grad():
            weights_only = models[name](input_ids=_ids()).logits
        assert (weights_only - refs[name]).abs().max() > 100 * LOGIT_RTOL * refs[name].abs().max()


@pytest.mark.slow
@needs_ct
def test_cli_exports_a_saved_bert_folder(tmp_path):
    model = tiny_bert().quantize_qlimit(calib_samples(8), _config())
    model.save_pretrained(tmp_path / "qlimit")
    ref = _reference(model)
    cli = [sys.executable, "-m", "hf_qlimit.export", str(tmp_path / "qlimit"), str(tmp_path / "ct")]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (got,) = _load_elsewhere([tmp_path / "ct"], "AutoModelForSequenceClassification", tmp_path)
    _assert_close(got, ref)


def test_attention_quantizers_are_refused(tmp_path):
    model = _llama(weight_bits=8, act_bits=8, group_size=None)  # quantize_attention defaults to True
    with pytest.raises(ExportError, match="Q·Kᵀ and P·V.*quantize_attention=False"):
        hf_qlimit.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_block_output_quantizers_are_refused(tmp_path):
    model = tiny_bert().quantize_qlimit(
        calib_samples(8),
        _config(weight_bits=8, act_bits=8, group_size=None, quantize_attention=False, act_layout="block_output"),
    )
    with pytest.raises(ExportError, match="block_output"):
        hf_qlimit.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_w4a8_is_refused(tmp_path):
    with pytest.raises(ExportError, match="W4A8.*int-quantized"):
        hf_qlimit.export(_llama(act_bits=8, quantize_attention=False), tmp_path / "out")


def test_asymmetric_low_bits_are_refused_unless_allowed(tmp_path, caplog):
    model = _llama(weight_bits=3)
    with pytest.raises(ExportError, match="asymmetric 3-bit.*weight_sym=True.*allow_unservable"):
        hf_qlimit.export(model, tmp_path / "out")
    hf_qlimit.export(model, tmp_path / "out", allow_unservable=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]


@pytest.mark.slow
def test_cli_reports_a_refusal(tmp_path):
    _llama(weight_bits=8, act_bits=8, group_size=None).save_pretrained(tmp_path / "qlimit")
    cli = [sys.executable, "-m", "hf_qlimit.export", str(tmp_path / "qlimit"), str(tmp_path / "ct")]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "error:" in run.stderr and "quantize_attention=False" in run.stderr


@needs_ct
@pytest.mark.parametrize("bits,n", [(4, 48), (3, 40), (8, 16), (2, 33)])
def test_packing_is_compressed_tensors_own(bits, n):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from hf_qlimit.export.ct_format import pack_int32

    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes, bits).t(), pack_to_int32(signed.t().contiguous(), bits, 0))  # zero points


needs_gguf = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gguf") is None, reason="the `gguf` package is not installed"
)


@pytest.mark.parametrize("format", ["compressed-tensors", pytest.param("gguf", marks=needs_gguf)])
def test_explicit_input_transforms_are_refused(tmp_path, format):
    from hf_qlimit.transforms.input_op import InputTransform

    model = _llama(group_size=32)
    mlp = model.model.layers[0].mlp
    # built around a float Linear of the same shape (a frozen QuantLinear's `.weight` is its flat code buffer)
    op = InputTransform(torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features), rotate=True)
    op.linear, mlp.down_proj = mlp.down_proj, op
    with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj.*online Hadamard rotation"):
        hf_qlimit.export(model, tmp_path / "out", format=format)
