"""Mixed precision: sensitivities, the bit-allocation ILP and its budgets, the cache, and a mixed-bit round trip."""

from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest
import torch
from helpers import calib_samples, logits, tiny_bert, tiny_opt
from transformers import AutoModelForSequenceClassification

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit import mixed_precision as mp
from hf_qlimit.calibration import pipeline
from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration
from hf_qlimit.mixed_precision import cache as mp_cache
from hf_qlimit.mixed_precision import sensitivity as mp_sensitivity
from hf_qlimit.models import get_adapter

CANDIDATES = [2, 4, 8]
N_SAMPLES, BATCH = 16, 8


def _config(**kwargs) -> QLimitConfig:
    base = {
        "bit_candidates": CANDIDATES,
        "avg_bits": 3.0,
        "num_samples": N_SAMPLES,
        "batch_size": BATCH,
        "method": "rtn",
    }
    return QLimitConfig(**{**base, **kwargs})


def _batches(config: QLimitConfig) -> list[dict[str, torch.Tensor]]:
    """The padded calibration batches, as the pipeline builds them."""
    data = prepare_calibration(calib_samples(N_SAMPLES), config.num_samples, config.max_length, 1, config.seed)
    return length_sorted_batches(data, config.batch_size)


def _allocate(model, config: QLimitConfig) -> dict[str, int]:
    return mp.allocate_bits(model, get_adapter(model), _batches(config), config, torch.device("cpu"))


def _costs(model, config: QLimitConfig) -> dict[str, mp.LayerCost]:
    return mp.layer_costs(model, mp.block_linears(model, get_adapter(model), config), config)


@pytest.fixture(scope="module")
def measured() -> tuple[mp.Sensitivity, dict[str, mp.LayerCost]]:
    """Sensitivities and costs of tiny_bert, measured once for the ILP tests."""
    model, config = tiny_bert(), _config()
    names = list(mp.block_linears(model, get_adapter(model), config))
    sens = mp.measure_sensitivity(model, get_adapter(model), _batches(config), config, torch.device("cpu"), names)
    return sens, _costs(model, config)


def test_sensitivity_shrinks_with_bits(measured):
    sens, costs = measured
    assert set(sens.singles) == set(costs) and len(costs) == 12  # 6 Linears in each of 2 blocks
    for per_bits in sens.singles.values():
        assert per_bits[2] > per_bits[4] > per_bits[8] > 0
    assert len(sens.pairs) == 2 * 15  # every pair inside each block, none across blocks
    assert all(a.split(".")[3] == b.split(".")[3] for a, b in sens.pairs)


@pytest.mark.parametrize(
    "budget",
    [
        {"avg_bits": 3.0},
        {"avg_bits": 2.5},
        {"avg_bits": 7.9},
        {"avg_bits": None, "size_budget_bytes": 9000},
        {"avg_bits": 8.0, "bops_budget": 4.0e5},
    ],
)
def test_ilp_respects_budget_and_reports_its_usage(measured, budget):
    sens, costs = measured
    alloc = mp.solve_allocation(sens, costs, _config(**budget))
    assert set(alloc.bits) == set(costs) and set(alloc.bits.values()) <= set(CANDIDATES)
    usage = mp.budget_usage(costs, alloc.bits)
    assert alloc.usage == usage
    if budget["avg_bits"] is not None:  # integer totals: exact, no tolerance
        params = sum(c.params for c in costs.values())
        assert sum(costs[n].params * b for n, b in alloc.bits.items()) <= budget["avg_bits"] * params
        assert usage["avg_bits"] <= budget["avg_bits"]
    if "size_budget_bytes" in budget:
        assert usage["bytes"] <= budget["size_budget_bytes"]
    if "bops_budget" in budget:
        assert usage["bops"] <= budget["bops_budget"] and alloc.allowed["bops"] == budget["bops_budget"]
    expected = sum(sens.singles[n][b] for n, b in alloc.bits.items())
    expected += sum(max(v, 0) for (a, b), v in sens.pairs.items() if alloc.bits[a] == alloc.bits[b] == 2)
    assert alloc.predicted_loss == pytest.approx(expected)


def test_ilp_is_optimal_on_a_small_instance():
    """Brute force over the 3^5 assignments, pair terms included, against the ILP."""
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(5)]
    params = [int(p) for p in rng.integers(100, 1000, 5)]
    costs = {n: mp.LayerCost(p, 8, {b: p * b // 8 + 10 for b in CANDIDATES}) for n, p in zip(names, params)}
    singles = {n: {2: float(rng.uniform(1, 4)), 4: float(rng.uniform(0.2, 0.8)), 8: 0.01} for n in names}
    pairs = {("l0", "l1"): 3.0, ("l2", "l3"): -1.0, ("l1", "l4"): 0.5}  # the negative one is ignored
    config = _config(avg_bits=3.5)
    alloc = mp.solve_allocation(mp.Sensitivity(singles, pairs), costs, config)
    limit = mp.budget_limits(costs, config)["bits"]

    def loss(combo: tuple[int, ...]) -> float:
        bits = dict(zip(names, combo))
        return sum(singles[n][b] for n, b in bits.items()) + sum(
            v for (a, c), v in pairs.items() if v > 0 and bits[a] == bits[c] == 2
        )

    feasible = [c for c in itertools.product(CANDIDATES, repeat=5) if sum(p * b for p, b in zip(params, c)) <= limit]
    assert alloc.predicted_loss == pytest.approx(min(map(loss, feasible)))
    assert loss(tuple(alloc.bits[n] for n in names)) == pytest.approx(alloc.predicted_loss)


def test_impossible_budget_names_the_minimum(measured):
    sens, costs = measured
    with pytest.raises(ValueError, match=r"minimum achievable avg_bits is 2\b"):
        mp.solve_allocation(sens, costs, _config(avg_bits=1.5))
    floor = mp.budget_usage(costs, {n: 2 for n in costs})["bytes"]
    with pytest.raises(ValueError, match=f"minimum achievable size_budget_bytes is {floor:.6g}"):
        mp.solve_allocation(sens, costs, _config(avg_bits=None, size_budget_bytes=int(floor) - 1))


def test_pinned_modules_keep_their_bits_and_count_in_the_budget():
    model, pinned = tiny_bert(), "bert.encoder.layer.0.intermediate.dense"
    bits = _allocate(model, _config(module_bits={"*.layer.0.intermediate.dense": 8}, avg_bits=4.0))
    assert pinned not in bits and len(bits) == 11
    assert mp.budget_usage(_costs(model, _config()), {**bits, pinned: 8})["avg_bits"] <= 4.0


def _dead_feature(norm: str):
    """tiny_bert with feature 0 of a LayerNorm output forced to 0: the Linears reading it ignore their column 0."""
    model = tiny_bert()
    with torch.no_grad():
        model.get_submodule(norm).weight[0] = model.get_submodule(norm).bias[0] = 0
    return model


@pytest.mark.parametrize(
    "target, norm",
    [
        ("bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.attention.output.LayerNorm"),
        ("bert.encoder.layer.0.attention.self.value", "bert.embeddings.LayerNorm"),
    ],
)
def test_a_layer_made_more_sensitive_gets_at_least_as_many_bits(target, norm, inputs):
    config = _config(avg_bits=3.0)
    before = _allocate(_dead_feature(norm), config)
    model = _dead_feature(norm)
    with torch.no_grad():  # an outlier column on a dead input: same function, but a per-channel grid 20× coarser
        weight = model.get_submodule(target).weight
        weight[:, 0] = 20 * weight.abs().max()
    assert torch.equal(logits(model, inputs), logits(_dead_feature(norm), inputs))
    after = _allocate(model, config)
    assert after[target] >= before[target]
    assert after[target] == 8 > before[target]


def test_causal_lm_allocation_respects_the_budget():
    """OPT: token-level logits, so the Fisher uses one sampled label per position."""
    model, config = tiny_opt(), _config(avg_bits=3.0)
    bits = _allocate(model, config)
    costs = _costs(model, config)
    assert set(bits) == set(costs) and len(costs) == 12 and len(set(bits.values())) > 1
    assert mp.budget_usage(costs, bits)["avg_bits"] <= 3.0


def test_save_and_reload_with_mixed_bits_gives_identical_outputs(tmp_path, inputs):
    model = tiny_bert()
    bits = _allocate(model, _config(avg_bits=3.0))
    assert len(set(bits.values())) > 1, "the test needs a truly mixed allocation"
    config = QLimitConfig(act_bits=8, method="rtn", num_samples=N_SAMPLES, batch_size=BATCH, module_bits=bits)
    hf_qlimit.quantize(model, calib_samples(N_SAMPLES), config)
    layer_config = model.config.quantization_config.layer_config
    assert all(layer_config[n]["w"] == b == model.get_submodule(n).weight_quantizer.bits for n, b in bits.items())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, inputs), logits(reloaded, inputs))
    # The size budget counts exactly the bytes the block Linears store (codes, scales, zero points).
    stored = sum(
        t.numel() * t.element_size()
        for n in bits
        for k, t in reloaded.get_submodule(n).state_dict().items()
        if k != "bias" and not k.startswith("input_quantizer.")
    )
    costs = mp.layer_costs(reloaded, {n: {"w": b, "a": 8} for n, b in bits.items()}, _config())
    assert stored == mp.budget_usage(costs, bits)["bytes"]


def test_cache_hit_skips_measurement(tmp_path, monkeypatch):
    cache, calls = tmp_path / "sens.json", []
    measure = mp.measure_sensitivity
    monkeypatch.setattr(mp_cache, "measure_sensitivity", lambda *a, **k: calls.append(1) or measure(*a, **k))
    model = tiny_bert()
    first = _allocate(model, _config(avg_bits=3.0, sensitivity_cache=str(cache)))
    assert len(calls) == 1 and cache.exists()
    second = _allocate(model, _config(avg_bits=5.0, sensitivity_cache=str(cache)))  # another budget: read back
    assert len(calls) == 1 and sum(second.values()) > sum(first.values())
    _allocate(model, _config(bit_candidates=[2, 8], sensitivity_cache=str(cache)))  # other candidates: measured
    assert len(calls) == 2
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1.5)  # other weights, same config: measured again
    _allocate(model, _config(sensitivity_cache=str(cache)))
    assert len(calls) == 3 and len(json.loads(cache.read_text())["entries"]) == 3


def test_a_folder_as_cache_fails_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(mp_cache, "measure_sensitivity", lambda *a, **k: pytest.fail("measured"))
    config = _config(sensitivity_cache=str(tmp_path))  # built: the config does not look at the files
    with pytest.raises(ValueError, match="`sensitivity_cache` must be the path of a JSON file"):
        _allocate(tiny_bert(), config)


@pytest.mark.skipif(
    "allocate_bits" not in inspect.getsource(pipeline), reason="the pipeline does not call allocate_bits"
)
def test_pipeline_allocates_mixed_bits():
    model, config = tiny_bert(), _config(avg_bits=3.0)
    expected = _allocate(tiny_bert(), config)
    hf_qlimit.quantize(model, calib_samples(N_SAMPLES), config)
    saved = model.config.quantization_config
    assert {n: saved.layer_config[n]["w"] for n in expected} == expected
    assert all(saved.module_bits[n] == b for n, b in expected.items())


def test_batches_split_for_memory_give_the_same_single_sensitivities(measured, monkeypatch):
    """The singles are sums over samples: measuring in one-row slices must not change them."""
    model, config = tiny_bert(), _config()
    names = list(mp.block_linears(model, get_adapter(model), config))
    monkeypatch.setattr(mp_sensitivity, "_MAX_TOKENS", 1)  # one row per forward pass
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    split = mp.measure_sensitivity(
        model, get_adapter(model), _batches(config), config, torch.device("cpu"), names, pairwise=False
    )
    assert len(passes) == N_SAMPLES  # the batches were split
    whole = measured[0].singles
    for n in names:
        for bits in CANDIDATES:
            assert split.singles[n][bits] == pytest.approx(whole[n][bits], rel=1e-4)
