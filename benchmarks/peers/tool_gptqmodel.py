"""GPTQModel worker: GPTQ (`GPTQModel.load(path, QuantizeConfig)` then `.quantize(calibration)`), saved with
`.save()` (GPTQ packed int32 format).

Asymmetric weights (`sym=False`), `desc_act=False`, per-channel as `group_size=-1`. GPTQModel knows decoder
LMs only (its model table); the LM head stays FP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers import peer_eval


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"gptqmodel": version("gptqmodel")}


def check(algo: str, model: str, setting: peer_eval.Setting, options: dict[str, Any]) -> None:
    if algo != "gptq":
        raise peer_eval.Unsupported(f"GPTQModel worker runs gptq only, not {algo!r}")
    if setting.act_bits is not None:
        raise peer_eval.Unsupported("GPTQ in GPTQModel is weight-only")


def load(model: str, path: Path, setting: peer_eval.Setting):
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    config = QuantizeConfig(bits=setting.weight_bits, group_size=setting.group_size or -1, sym=False, desc_act=False)
    return GPTQModel.load(str(path), config, device="cpu"), AutoTokenizer.from_pretrained(path)


def quantize(net, calib, setting: peer_eval.Setting, algo: str, model: str, options: dict[str, Any]):
    data = [
        {
            "input_ids": ex["input_ids"].unsqueeze(0),
            "attention_mask": ex.get("attention_mask", ex["input_ids"] * 0 + 1).unsqueeze(0),
        }
        for ex in calib
    ]
    net.quantize(data, batch_size=1)
    options["details"] = "asymmetric, desc_act off"
    return net


def save(net, out_dir: Path) -> None:
    net.save(str(out_dir))


def eval_model(net):
    return net.model
