"""Models dispatched with accelerate offload, resumable runs, and calibration caches that spill to disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import calib_samples, logits, tiny_opt
from transformers import AutoModelForCausalLM

from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.resume import WorkDir

# no transforms: an offloaded model leaves the default rotation out, the in-memory one would apply it
CONFIG = {"weight_bits": 4, "act_bits": 8, "method": "qdrop", "iters": 20, "batch_size": 4, "transforms": []}


@pytest.fixture(scope="module")
def saved_opt(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt")
    tiny_opt().save_pretrained(path)
    return path


def _quantize(model, **kwargs):
    model.quantize_qlimit(calib_samples(16), QLimitConfig(**CONFIG), **kwargs)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def in_memory(saved_opt):
    return _state(_quantize(AutoModelForCausalLM.from_pretrained(saved_opt)))


def test_disk_offload_gives_the_in_memory_result(saved_opt, in_memory, tmp_path, inputs):
    model = AutoModelForCausalLM.from_pretrained(saved_opt, device_map={"": "disk"}, offload_folder=tmp_path / "off")
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    _quantize(model)
    # finished blocks and the quantized embeddings went back to disk, the rest is on CPU
    meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    assert {n.split(".layers.")[1].split(".")[0] for n in meta if ".layers." in n} == {"0", "1"}
    outside = {n for n in meta if ".layers." not in n}
    assert "model.decoder.embed_tokens.weight" in outside
    assert all(n.startswith(("model.decoder.embed_tokens.", "model.decoder.embed_positions.")) for n in outside)
    assert all(t.device.type in ("cpu", "meta") for t in model.state_dict().values())
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")  # several shards, streamed from the parked files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    _assert_same(_state(reloaded), in_memory)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))  # the parked model runs through its hooks


def test_cache_over_budget_spills_and_gives_the_same_result(saved_opt, in_memory, tmp_path, monkeypatch):
    from hf_qlimit.calibration import cache

    spilled = []
    original = cache.ActivationCache._keep

    def keep(self, tensor):
        item = original(self, tensor)
        spilled.append(not isinstance(item, torch.Tensor))
        return item

    monkeypatch.setattr(cache.ActivationCache, "_keep", keep)
    model = _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path, cache_budget_bytes=20_000)
    assert any(spilled) and not all(spilled)  # some in RAM, the rest on disk
    _assert_same(_state(model), in_memory)


def test_interrupted_after_a_block_then_resumed_gives_the_same_result(saved_opt, in_memory, tmp_path, monkeypatch):
    original = WorkDir.save_block

    def save_then_stop(self, i, *args):
        original(self, i, *args)
        raise KeyboardInterrupt  # as if stopped right after block 0

    monkeypatch.setattr(WorkDir, "save_block", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path)
    monkeypatch.setattr(WorkDir, "save_block", original)

    with pytest.raises(ValueError, match="resume=True"):  # progress is never overwritten silently
        _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path)
    model = _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path, resume=True)
    _assert_same(_state(model), in_memory)
    assert [s["block"] for s in model.qlimit_block_errors] == [0, 1]


@pytest.mark.slow
def test_killed_with_sigkill_then_resumed(saved_opt, in_memory, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import calib_samples
        from transformers import AutoModelForCausalLM
        from hf_qlimit import QLimitConfig
        from hf_qlimit.calibration.resume import WorkDir
        original = WorkDir.save_block
        def save_then_die(self, i, *args):
            original(self, i, *args)
            os.kill(os.getpid(), signal.SIGKILL)
        WorkDir.save_block = save_then_die
        model = AutoModelForCausalLM.from_pretrained({str(saved_opt)!r})
        model.quantize_qlimit(calib_samples(16), QLimitConfig(**{CONFIG!r}), work_dir={str(tmp_path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == -9, result.stderr[-2000:]
    model = _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path, resume=True)
    _assert_same(_state(model), in_memory)


def test_a_work_dir_of_another_run_is_refused(saved_opt, tmp_path):
    _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), work_dir=tmp_path)
    other = {**CONFIG, "weight_bits": 2}
    with pytest.raises(ValueError, match="another quantization"):
        AutoModelForCausalLM.from_pretrained(saved_opt).quantize_qlimit(
            calib_samples(16), QLimitConfig(**other), work_dir=tmp_path, resume=True
        )


def test_resume_needs_a_work_dir(saved_opt):
    with pytest.raises(ValueError, match="work_dir"):
        _quantize(AutoModelForCausalLM.from_pretrained(saved_opt), resume=True)
