"""The layers beyond nn.Linear / nn.Embedding (#30, item 3), on tests/model_zoo.py's tiny models: GPT-2's Conv1D,
FalconLinear, Gemma's scaled embedding, the fused 3-D experts of Mixtral and Qwen3-MoE (each expert on its own
grid, the router left in FP), and a Linear subclass with another forward (skipped, with a warning). Each type is
quantized W4 g32 RTN weight-only and W4A8 with a few reconstruction iterations, saved, and reloaded in one fresh
process bit-exactly in every inference mode."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap

import model_zoo as mz
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_qlimit import QLimitConfig, set_inference_mode
from hf_qlimit.hf.surgery import quantized_modules
from hf_qlimit.models import get_adapter
from hf_qlimit.nn.experts import QuantExperts, QuantExpertWeight
from hf_qlimit.nn.modules import QuantLinear
from hf_qlimit.nn.wrapped_embedding import QuantWrappedEmbedding
from hf_qlimit.quantizers import WeightQuantizer

TYPES = ("gpt2", "falcon", "gemma", "mixtral", "qwen3_moe")
SETTINGS = {
    "rtn": {"weight_bits": 4, "act_bits": None, "group_size": 32, "method": "rtn"},
    "w4a8": {"weight_bits": 4, "act_bits": 8, "iters": 4},
}
MODES = ("packed", "dequantize", "cached")


def qconfig(setting: str, model_type: str = "") -> QLimitConfig:
    extra = {"quantize_attention": False} if model_type in mz.OWN_ATTENTION and setting != "rtn" else {}
    return QLimitConfig(num_samples=4, batch_size=2, **SETTINGS[setting], **extra)


def quantize(model_type: str, setting: str) -> tuple[nn.Module, nn.Module]:
    """(FP model, its quantized copy)."""
    fp = mz.build(model_type)
    model = copy.deepcopy(fp)
    model.quantize_qlimit(mz.calib(model_type, 4), qconfig(setting, model_type))
    return fp, model


def mode_logits(model: nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    out = {}
    for mode in MODES:
        set_inference_mode(model, mode)
        out[mode] = mz.logits(model, mz.eval_batch(model_type))
    set_inference_mode(model, "packed")
    return out


@pytest.fixture(scope="module")
def quantized():
    """(type, setting) -> (FP model, quantized model)."""
    return {(t, s): quantize(t, s) for t in TYPES for s in SETTINGS}


@pytest.fixture(scope="module")
def reloaded(quantized, tmp_path_factory):
    """(type, setting) -> (in-memory logits per mode, reloaded logits per mode), reloaded in ONE fresh process."""
    root = tmp_path_factory.mktemp("layer_kinds")
    jobs, expected = {}, {}
    for (t, s), (_, model) in quantized.items():
        path = root / f"{t}-{s}"
        model.save_pretrained(path)
        jobs[str(path)] = t
        expected[t, s] = mode_logits(model, t)
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)  # as the test process (conftest): other thread counts sum in another order
        sys.path.insert(0, "tests")
        import hf_qlimit, model_zoo as mz
        for path, t in {jobs!r}.items():
            model = mz.auto_class(t).from_pretrained(path, attn_implementation="eager")  # as the zoo builds
            out = {{}}
            for mode in {MODES!r}:
                hf_qlimit.set_inference_mode(model, mode)
                out[mode] = mz.logits(model, mz.eval_batch(t))
            torch.save(out, path + "/reloaded.pt")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {(t, s): (expected[t, s], torch.load(root / f"{t}-{s}" / "reloaded.pt")) for t in TYPES for s in SETTINGS}


def block_matrices(fp: nn.Module) -> int:
    """Projection matrices inside the FP model's blocks: Linears (subclasses too), Conv1Ds, one per expert of each
    3-D expert weight; routers (`gate` beside `experts`) left out."""
    count = 0
    for name, module in fp.named_modules():
        if ".h." not in name and ".layers." not in name:
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and not name.endswith(".gate"):
            count += 1
        count += sum(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)
    return count


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model_type", TYPES)
def test_every_block_matrix_is_quantized(quantized, model_type, setting):
    fp, model = quantized[model_type, setting]
    found = 0
    for name, module in quantized_modules(model):
        if ".h." in name or ".layers." in name:
            found += module.experts if isinstance(module, QuantExpertWeight) else 1
    assert found == block_matrices(fp) > 0
    left = [n for n, m in model.named_modules() if isinstance(m, Conv1D) or type(m).__name__ == "FalconLinear"]
    assert not left


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model_type", TYPES)
def test_reloaded_in_a_fresh_process_bit_exactly_in_every_mode(reloaded, model_type, setting):
    expected, got = reloaded[model_type, setting]
    for mode in MODES:
        assert torch.equal(got[mode], expected[mode]), mode


def test_conv1d_is_quantized_on_its_out_in_view(quantized):
    fp, model = quantized["gpt2", "rtn"]
    plan = model.config.quantization_config.layer_config
    convs = {n: m for n, m in fp.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8 and all(plan[n]["kind"] == "conv1d" for n in convs)
    for name, conv in convs.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear) and (q.out_features, q.in_features) == (conv.nf, conv.nx)
        w = q.dequantize_rows()
        assert (w - conv.weight.t()).norm() < 0.15 * conv.weight.norm()
        if conv.nf == conv.nx:  # a square Conv1D quantized as stored (not transposed) would look right by shape
            assert (w - conv.weight).norm() > conv.weight.norm()
        x = torch.randn(3, conv.nx)
        with torch.no_grad():
            assert (q(x) - conv(x)).norm() < 0.15 * conv(x).norm()


def test_gemma_embedding_keeps_its_scaled_forward(quantized):
    fp, model = quantized["gemma", "rtn"]
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantWrappedEmbedding) and emb.reads_head_codes  # tied: it gathers from the head's codes
    reference = copy.deepcopy(fp.get_input_embeddings())  # GemmaTextScaledWordEmbedding, scale sqrt(32)
    ids = mz.eval_batch("gemma")["input_ids"]
    with torch.no_grad():
        reference.weight.copy_(emb.dequantize_rows())
        expected = reference(ids)
        assert not torch.equal(expected, nn.functional.embedding(ids, reference.weight))  # the scale matters
        for mode in MODES:
            set_inference_mode(model, mode)
            assert torch.equal(emb(ids), expected), mode
    set_inference_mode(model, "packed")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_each_expert_matrix_on_its_own_grid_and_the_router_in_fp(quantized, model_type):
    fp, model = quantized[model_type, "rtn"]
    config = model.config.quantization_config
    for i, layer in enumerate(model.model.layers):
        experts, fp_experts = layer.mlp.experts, fp.model.layers[i].mlp.experts
        assert isinstance(experts, QuantExperts)
        assert set(experts.expert_weights()) == {"gate_up_proj", "down_proj"}
        for param, weight in experts.expert_weights().items():
            full = getattr(fp_experts, param).detach()  # [E, out, in]
            e, out, inp = full.shape
            assert weight.weight_quantizer.scale.shape == (e * out, inp // 32)
            for k in range(e):  # expert k's rows: the grid and codes of RTN on expert k's matrix alone
                alone = WeightQuantizer(4, (out, inp), 32, config.weight_sym)
                alone.init_range(full[k], config.weight_range_p)
                rows = slice(k * out, (k + 1) * out)
                assert torch.equal(weight.weight_quantizer.scale[rows], alone.scale)
                assert torch.equal(weight.dequantize_rows(rows), alone(full[k]))
        gate = layer.mlp.gate  # the router: not converted, weight untouched
        assert f"model.layers.{i}.mlp.gate" not in config.layer_config
        assert not any(n.startswith(f"model.layers.{i}.mlp.gate.") for n, _ in quantized_modules(model))
        assert torch.equal(gate.weight, fp.model.layers[i].mlp.gate.weight)


class DoubledLinear(nn.Linear):
    """A Linear subclass whose forward is not a plain matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class MatmulLinear(nn.Linear):
    """Another forward that is still x·Wᵀ + b (like FalconLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class PlainLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward."""


def _swap(model: nn.Module, name: str, cls: type[nn.Linear]) -> None:
    old = model.get_submodule(name)
    new = cls(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.set_submodule(name, new)


def test_a_linear_subclass_with_another_forward_is_skipped_with_a_warning():
    model = mz.build("llama")
    _swap(model, "model.layers.0.mlp.down_proj", DoubledLinear)
    _swap(model, "model.layers.0.mlp.up_proj", MatmulLinear)
    _swap(model, "model.layers.1.mlp.up_proj", PlainLinear)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("hf_qlimit.hf.layer_kinds")
    logger.addHandler(handler)
    try:
        plan = get_adapter(model).layer_config(model, qconfig("rtn"))
    finally:
        logger.removeHandler(handler)
    assert "model.layers.0.mlp.down_proj" not in plan
    assert plan["model.layers.0.mlp.up_proj"]["kind"] == plan["model.layers.1.mlp.up_proj"]["kind"] == "linear"
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("model.layers.0.mlp.down_proj (DoubledLinear)" in m for m in warned), warned
    assert not any("up_proj" in m for m in warned)


@pytest.fixture
def warnings_seen():
    """The warnings hf_qlimit logs during the test (warning_once's memory cleared first)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("hf_qlimit")
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _codes_off_rtn(fp: nn.Module, model: nn.Module) -> list[int]:
    """Per expert weight: how many of its dequantized entries differ from round-to-nearest on its own grid."""
    counts = []
    for layer, fp_layer in zip(model.model.layers, fp.model.layers):
        for param, weight in layer.mlp.experts.expert_weights().items():
            full = getattr(fp_layer.mlp.experts, param).detach().reshape(weight.rows, weight.cols)
            counts.append(int((weight.dequantize_rows() != weight.weight_quantizer(full)).sum()))
    return counts


def test_block_reconstruction_learns_the_experts_rounding():
    fp = mz.build("mixtral")
    model = copy.deepcopy(fp)
    config = QLimitConfig(num_samples=4, batch_size=2, weight_bits=4, act_bits=None, method="qdrop", iters=8)
    model.quantize_qlimit(mz.calib("mixtral", 4), config)
    assert all(n > 0 for n in _codes_off_rtn(fp, model))


@pytest.mark.parametrize("kwargs", [{"method": "rtn", "weight_init": "gptq"}, {"method": "adaround", "iters": 4}])
def test_experts_start_from_rtn_with_a_warning_where_a_method_takes_linears_only(kwargs, warnings_seen):
    fp = mz.build("mixtral")
    model = copy.deepcopy(fp)
    model.quantize_qlimit(mz.calib("mixtral", 4), QLimitConfig(num_samples=4, batch_size=2, act_bits=None, **kwargs))
    assert not any(_codes_off_rtn(fp, model))
    assert any("QuantExpertWeights of fused MoE experts" in r.getMessage() for r in warnings_seen)


def test_mixed_precision_measures_a_conv1d_on_its_out_in_view():
    """GPT-2 with one Conv1D swapped for the equal nn.Linear (weight transposed) measures the same sensitivities."""
    from hf_qlimit import mixed_precision as mp
    from hf_qlimit.calibration.data import length_sorted_batches, prepare_calibration

    config = QLimitConfig(bit_candidates=[2, 4], avg_bits=3.0, num_samples=4, batch_size=2, method="rtn")
    model = mz.build("gpt2")
    twin = copy.deepcopy(model)
    name = "transformer.h.0.attn.c_proj"  # square: a wrong orientation keeps every shape
    conv = twin.get_submodule(name)
    linear = nn.Linear(conv.nx, conv.nf)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    twin.set_submodule(name, linear)
    data = prepare_calibration(mz.calib("gpt2", 4), config.num_samples, config.max_length, 1, config.seed)
    batches = length_sorted_batches(data, config.batch_size)
    names = list(mp.block_linears(model, get_adapter(model), config))
    assert name in names and len(names) == 8
    got, want = (
        mp.measure_sensitivity(m, get_adapter(m), batches, config, torch.device("cpu"), names) for m in (model, twin)
    )
    for bits in (2, 4):
        assert got.singles[name][bits] == pytest.approx(want.singles[name][bits], rel=1e-4)
    assert got.pairs == pytest.approx(want.pairs, rel=1e-4)
    allocated = mp.allocate_bits(model, get_adapter(model), batches, config, torch.device("cpu"))
    assert set(allocated) == set(names)


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral"])
def test_compressed_tensors_export_refuses_conv1d_and_fused_experts(quantized, model_type, tmp_path):
    """compressed-tensors has no Conv1D layout, and transformers loads its MoE experts without zero points: the
    export refuses both (asymmetric W4 here; tests/test_export_any_model.py has the whole matrix)."""
    import hf_qlimit
    from hf_qlimit.export.common import ExportError

    with pytest.raises(ExportError, match=r"has no Conv1D layout|experts\) have asymmetric weights"):
        hf_qlimit.export(quantized[model_type, "rtn"][1], tmp_path / "out")
