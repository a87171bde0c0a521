"""The compressed-tensors export over the any-model matrix (issue #30, item 8): every type of tests/model_zoo.py,
quantized with RTN in the export's settings, exported, then reloaded by plain transformers (+ compressed-tensors)
in ONE fresh process that never imports hf_qlimit, and compared with hf_qlimit's fake-quantized model.

Settings: W4 g32 weight-only (asymmetric: `pack-quantized` that transformers dequantizes at load), the same
symmetric (Linears kept compressed in transformers, except where the family's weight init reads `.weight`;
MoE experts written per expert, which transformers dequantizes and fuses; BART's tied head written as floats)
and W8A8 (`int-quantized`, static input scales). Every type either reloads within `LOGIT_RTOL` of hf_qlimit's model
(measured on transformers 5.25 + compressed-tensors 0.20: bit-exact, error 0, for every type and setting
exported; the quantized outputs are 0.10-0.39 (W4) and 0.014-0.070 (W8A8) from FP, relative L2), or is
refused at export time by an `ExportError` that names the type, the module and why, and nothing is written:
- gpt2 (Conv1D, weight stored [in, out]): compressed-tensors has no Conv1D layout;
- mixtral, qwen3_moe: asymmetric experts (transformers' loader dequantizes experts without zero points) and
  W8A8 experts (it loads them dequantized, without activation quantization).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import model_zoo as zoo
import pytest
import torch

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.quant_state import quant_state
from hf_qlimit.export import ExportError

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("compressed_tensors") is None,
    reason="the `compressed-tensors` package is not installed (pip install compressed-tensors)",
)

COMMON = {"num_samples": 8, "batch_size": 4, "method": "rtn"}
SETTINGS = {
    "w4g32": {"weight_bits": 4, "group_size": 32, "act_bits": None},
    "w4g32-sym": {"weight_bits": 4, "group_size": 32, "act_bits": None, "weight_sym": True},
    "w8a8": {"weight_bits": 8, "act_bits": 8, "quantize_attention": False, "act_dynamic": False, "transforms": []},
}
# float32 on both sides, the same codes and scales: only the summation order may differ
LOGIT_RTOL = 1e-5
MOE = ("mixtral", "qwen3_moe")
# their weight init (which transformers runs on loading) reads a packed Linear's `.weight`: FalconLinear,
# ModernBERT's attention and MLP, T5's feed-forward. Their symmetric W4 folders ask transformers to dequantize.
DEQUANTIZED_AT_LOAD = ("falcon", "modernbert", "t5")


def refusal(model_type: str, setting: str) -> str | None:
    """What the ExportError for (type, setting) says (a regular expression), None where the export must work."""
    if model_type == "gpt2":
        return r"gpt2: 8 quantized modules are transformers' Conv1D \(first: 'transformer\.h\.0\.attn\.c_attn'\)"
    if model_type in MOE and setting == "w4g32":
        return rf"{model_type}: 'model\.layers\.0\.mlp\.experts' \(fused MoE experts\) have asymmetric weights"
    if model_type in MOE and setting == "w8a8":
        return rf"{model_type}: 'model\.layers\.0\.mlp\.experts' \(fused MoE experts\) quantize their input"
    return None


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def export_case(model_type: str, setting: str, out: Path, saved: bool = False) -> dict[str, Any]:
    """Quantizes, exports to `out` (from the hf_qlimit folder it saved, with `saved`) and records what the reload
    is compared with, or the export's refusal."""
    model = zoo.build(model_type)
    batch = zoo.eval_batch(model_type)
    fp = zoo.outputs(model, batch)
    model.quantize_qlimit(zoo.calib(model_type), QLimitConfig(**SETTINGS[setting], **COMMON))
    hf_qlimit.set_inference_mode(model, "dequantize")  # exact fake quantization
    case = {"expected": zoo.outputs(model, batch), "fp": fp}
    if SETTINGS[setting]["act_bits"] is not None:
        with quant_state(model, weights=True, acts=False):
            case["weights_only"] = zoo.outputs(model, batch)
    if saved:  # loaded back by hf_qlimit.export (as the CLI does): a model from `from_pretrained`
        model.save_pretrained(out.with_name(out.name + "-qlimit"))
    try:
        hf_qlimit.export(out.with_name(out.name + "-qlimit") if saved else model, out)
    except ExportError as error:
        case["refused"] = str(error)
        case["written"] = out.exists()
    return case


RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import model_zoo as zoo
    errors = {}
    for path in sys.argv[2:]:
        try:
            model_type = json.load(open(f"{path}/config.json"))["model_type"]
            model = zoo.auto_class(model_type).from_pretrained(path, attn_implementation="eager").eval()
            torch.save(zoo.outputs(model, zoo.eval_batch(model_type)), f"{path}/reloaded.pt")
        except Exception as e:
            errors[path] = f"{type(e).__name__}: {e}"
    assert "hf_qlimit" not in sys.modules, "the export must load without hf_qlimit"
    print(json.dumps(errors))
    """
)


def reload_all(paths: list[Path]) -> dict[str, str]:
    """Reloads every folder in one fresh process without hf_qlimit; returns the errors by folder."""
    if not paths:
        return {}
    args = [sys.executable, "-c", RELOAD, str(Path(__file__).parent), *map(str, paths)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> dict[tuple[str, str], dict[str, Any]]:
    """(setting, model type) -> its case, with "reloaded" (outputs) or "reload_error": the selected tests'
    cases, all reloaded in one process."""
    tests = {"test_export_reloads_exactly_or_is_refused": "", "test_export_of_a_saved_folder_reloads_exactly": "saved-"}
    wanted = sorted(
        {
            (tests[item.originalname] + item.callspec.params["setting"], item.callspec.params["model_type"])
            for item in request.session.items
            if item.originalname in tests
        }
    )
    root = tmp_path_factory.mktemp("ct_matrix")
    cases = {
        (s, t): export_case(t, s.removeprefix("saved-"), root / f"{s}-{t}", saved=s.startswith("saved-"))
        for s, t in wanted
    }
    paths = [root / f"{s}-{t}" for (s, t), case in cases.items() if "refused" not in case]
    errors = reload_all(paths)
    for (s, t), case in cases.items():
        path = root / f"{s}-{t}"
        if str(path) in errors:
            case["reload_error"] = errors[str(path)]
        elif "refused" not in case:
            case["reloaded"] = torch.load(path / "reloaded.pt")
            case["config"] = json.loads((path / "config.json").read_text())["quantization_config"]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model_type", zoo.MATRIX)
def test_export_reloads_exactly_or_is_refused(exported, setting, model_type):
    case = exported[setting, model_type]
    expected_refusal = refusal(model_type, setting)
    if expected_refusal is not None:
        assert "refused" in case, f"exported, but {model_type} was expected to be refused ({expected_refusal})"
        assert re.search(expected_refusal, case["refused"]), case["refused"]
        assert not case["written"], "a refused export left a folder behind"
        return
    assert "refused" not in case, case.get("refused")
    assert "reload_error" not in case, case.get("reload_error")
    got, expected = case["reloaded"], case["expected"]
    assert max_error(got, expected) <= LOGIT_RTOL, f"relative error {max_error(got, expected):.2e}"
    # the folder holds the quantized model, not the FP one
    assert max_error(expected, case["fp"]) > 1e3 * LOGIT_RTOL
    if "weights_only" in case:  # the reloaded model quantizes its Linears' inputs too
        assert max_error(case["weights_only"], expected) > 1e2 * LOGIT_RTOL
    config = case["config"]
    assert config["format"] == ("int-quantized" if setting == "w8a8" else "pack-quantized")
    # asymmetric packed weights are always dequantized at load; symmetric ones stay compressed where they can
    dequantized = setting == "w4g32" or (setting == "w4g32-sym" and model_type in DEQUANTIZED_AT_LOAD)
    assert config.get("dequantize", False) == dequantized
    if model_type in MOE:  # one Linear per expert, in a group transformers finds by its `re:` targets
        targets = [t for group in config["config_groups"].values() for t in group["targets"]]
        assert any(t.startswith("re:") and "experts" in t for t in targets), targets


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["w4g32-sym"])
@pytest.mark.parametrize("model_type", ["mixtral", "falcon", "bart"])
def test_export_of_a_saved_folder_reloads_exactly(exported, setting, model_type):
    """`hf_qlimit.export(folder)` (the CLI's path) exports a model that `from_pretrained` loaded, whose own weight
    conversions are those of the hf_qlimit checkpoint (none): the experts' per-expert names, the tie and the weight
    init checks come from the class itself."""
    case = exported["saved-" + setting, model_type]
    assert "refused" not in case and "reload_error" not in case, case.get("refused") or case.get("reload_error")
    assert max_error(case["reloaded"], case["expected"]) <= LOGIT_RTOL
