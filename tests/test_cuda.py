"""The same chain on a GPU: quantize on CUDA, save, reload onto CUDA. Skipped where there is no GPU (CI)."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_samples, logits, tiny_bert, tiny_opt
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_qlimit import QLimitConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "make, auto, method",
    [(tiny_bert, AutoModelForSequenceClassification, "qdrop"), (tiny_opt, AutoModelForCausalLM, "brecq")],
)
def test_quantize_on_cuda_and_reload(make, auto, method, inputs, tmp_path):
    model = make().cuda()
    model.quantize_qlimit(calib_samples(24), QLimitConfig(weight_bits=2, act_bits=8, method=method, iters=40))
    assert all(p.device.type == "cuda" for p in model.parameters())
    for block in model.qlimit_block_errors:
        assert block["mse"] < block["rtn_mse"], block
    expected = logits(model, inputs.cuda())
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path, device_map="cuda")
    assert torch.equal(logits(reloaded, inputs.cuda()), expected)


def test_cpu_and_cuda_rtn_agree(inputs):
    """RTN has no randomness: the grids found on either device give (nearly) the same model."""
    cpu, gpu = tiny_bert(), tiny_bert().cuda()
    config = QLimitConfig(weight_bits=4, act_bits=8, method="rtn")
    cpu.quantize_qlimit(calib_samples(), config)
    gpu.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=4, act_bits=8, method="rtn"))
    torch.testing.assert_close(logits(gpu, inputs.cuda()).cpu(), logits(cpu, inputs), atol=1e-3, rtol=1e-3)
