"""Reconstruction mini-batches drawn at random from all calibration samples (`batch_sampling="random"`)."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_samples, tiny_bert, tiny_opt
from helpers import tiny_decoder as tiny

from hf_qlimit import QLimitConfig
from hf_qlimit.calibration import reconstruction
from hf_qlimit.calibration.block_inputs import call_block, capture_block_inputs, run_block
from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration
from hf_qlimit.calibration.reconstruction import BlockData, random_samples
from hf_qlimit.models import get_adapter

CPU = torch.device("cpu")


def test_random_draws_are_distinct_samples_from_every_batch():
    masks = [torch.ones(n, 4, dtype=torch.bool) for n in (3, 5, 2)]
    data = BlockData(fp_in=[], q_in=[], fp_out=[], inputs=None, token_mask=masks)
    draw = random_samples(data, batch_size=4)
    torch.manual_seed(0)
    seen, spanning = set(), 0
    for _ in range(200):
        key = draw()
        picked = [(j, int(r)) for j, rows in key for r in rows]
        assert len(picked) == len(set(picked)) == 4
        assert all(0 <= r < len(masks[j]) for j, r in picked)
        seen |= set(picked)
        spanning += len(key) > 1
    assert seen == {(j, r) for j, m in enumerate(masks) for r in range(len(m))}
    assert spanning > 150


def _padded_model_batches(family: str):
    model = {"bert": tiny_bert, "opt": tiny_opt, "llama": lambda: tiny("llama")}[family]()
    data = prepare_calibration(calib_samples(12, min_len=4, max_len=20), 12, None, 1)
    data["input_ids"] %= model.config.vocab_size
    batches = length_sorted_batches(data, 6)
    assert any(not bool(b["attention_mask"].all()) for b in batches)  # the rows differ in length: padding
    block = get_adapter(model).blocks(model)[0]
    hidden, inputs = capture_block_inputs(model, block, batches, CPU)
    return block, hidden, inputs, batches


@pytest.mark.parametrize("family", ["bert", "opt", "llama"])
def test_some_rows_of_a_batch_give_those_rows_of_its_output(family):
    """The masks and other per-sample arguments follow the rows picked: padded samples included."""
    block, hidden, inputs, batches = _padded_model_batches(family)
    full = run_block(block, hidden, inputs, CPU)
    for j, batch in enumerate(batches):
        rows = torch.tensor([4, 1, 5])
        with torch.no_grad():
            part = call_block(block, hidden[j][rows], inputs, j, CPU, rows)
        real = batch["attention_mask"][rows].bool()
        assert torch.allclose(part[real], full[j][rows][real], atol=1e-5)


@pytest.mark.parametrize("sampling", ["random", "fixed"])
def test_reconstruction_steps_on_the_sampling_asked_for(sampling, monkeypatch):
    calls = []
    real_call = reconstruction.call_block

    def spy(block, hidden, inputs, batch, device, rows=None):
        calls.append(rows)
        return real_call(block, hidden, inputs, batch, device, rows)

    monkeypatch.setattr(reconstruction, "call_block", spy)
    model = tiny_bert()
    config = QLimitConfig(weight_bits=2, act_bits=8, method="qdrop", iters=40, batch_size=6, batch_sampling=sampling)
    model.quantize_qlimit(calib_samples(24), config)
    sub_batches = [rows for rows in calls if rows is not None]
    if sampling == "fixed":
        assert not sub_batches
    else:
        assert len(sub_batches) >= 80  # 2 blocks x 40 steps, each step from more than one batch as a rule
        assert all(len(rows) < 6 for rows in sub_batches)
    for block in model.qlimit_block_errors:
        assert block["mse"] < block["rtn_mse"], block


def test_paper_preset_samples_at_random_and_the_fast_presets_use_fixed_batches():
    assert QLimitConfig(preset="paper").resolved(causal_lm=False).batch_sampling == "random"
    assert QLimitConfig(preset="fast").resolved(causal_lm=False).batch_sampling == "fixed"
    assert QLimitConfig().resolved(causal_lm=True).batch_sampling == "fixed"
    with pytest.raises(ValueError, match="batch_sampling"):
        QLimitConfig(batch_sampling="shuffled")


def test_random_sampling_pools_the_real_tokens_of_its_batches(monkeypatch):
    """A draw holding whole batches gives the token-weighted mean of their fixed-batch errors."""
    block, hidden, inputs, batches = _padded_model_batches("bert")
    masks = [b["attention_mask"].bool() for b in batches]
    torch.manual_seed(0)  # errors that differ by token and by batch
    target = [h + torch.rand(h.shape[:2] + (1,)) * (j + 1) for j, h in enumerate(run_block(block, hidden, inputs, CPU))]
    data = BlockData(fp_in=hidden, q_in=hidden, fp_out=target, inputs=inputs, token_mask=masks)
    seen = {}

    def fake_optimize(modules, acts, draw, step_fn, config, desc, starts=None, release_fp=False):
        with torch.no_grad():
            whole = [(j, torch.arange(len(m))) for j, m in enumerate(masks)]
            seen["pooled"] = reconstruction.masked_error(*step_fn(whole, train=False)).item()
            seen["fixed"] = [reconstruction.masked_error(*step_fn(j, train=False)).item() for j in range(len(masks))]
        return reconstruction.ReconStats()

    monkeypatch.setattr(reconstruction, "optimize", fake_optimize)
    config = QLimitConfig(method="brecq", batch_sampling="random", iters=1, batch_size=4)
    reconstruction.reconstruct_block(block, data, config, CPU, "test")
    tokens = [int(m.sum()) for m in masks]
    expected = sum(e * n for e, n in zip(seen["fixed"], tokens)) / sum(tokens)
    assert seen["pooled"] == pytest.approx(expected, rel=1e-5)
    assert abs(seen["pooled"] - sum(seen["fixed"]) / len(tokens)) > 1e-3 * seen["pooled"]  # not a mean of means
