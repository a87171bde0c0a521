"""optimum-quanto worker: weight-only round to nearest (qint4 / qint2 with MaxOptimizer, qint8 with absmax) and
W8A8 (qint8 weights, qint8 activations calibrated with `Calibration`).

Only the Linear layers of the transformer blocks are quantized (encoder layers of BERT; decoder layers of Llama),
as the GPTQ-family tools do: embeddings, pooler and heads stay FP32. quanto picks a group size itself for
qint4/qint2 (128, falling back by 32 until it divides the input size); the worker sets the module attribute
`weight_group_size` to the setting's group (None: per output channel) before `freeze`. quanto has no 3-bit type.
Saved as safetensors of the quantized state dict plus `quantization_map.json` (quanto's own format, reloadable
with `requantize`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.peers import peer_eval

BLOCKS = {"minilm-sst2": "bert.encoder.layer.*", "smollm2": "model.layers.*"}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"optimum-quanto": version("optimum-quanto")}


def check(algo: str, model: str, setting: peer_eval.Setting, options: dict[str, Any]) -> None:
    if algo != "rtn":
        raise peer_eval.Unsupported(f"quanto has only round to nearest, not {algo!r}")
    if setting.weight_bits not in (2, 4, 8):
        raise peer_eval.Unsupported(f"quanto has no {setting.weight_bits}-bit weights (qint2, qint4, qint8 only)")
    if setting.act_bits not in (None, 8):
        raise peer_eval.Unsupported(f"quanto has no {setting.act_bits}-bit activations")


def quantize(net, calib, setting: peer_eval.Setting, algo: str, model: str, options: dict[str, Any]):
    import torch
    from optimum.quanto import Calibration, QModuleMixin, freeze, qint2, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    weights = {2: qint2, 4: qint4, 8: qint8}[setting.weight_bits]
    activations = qint8 if setting.act_bits == 8 else None
    quanto_quantize(net, weights=weights, activations=activations, include=BLOCKS[model])
    groups = set()
    for module in net.modules():
        if isinstance(module, QModuleMixin) and setting.weight_bits < 8:
            module.weight_group_size = setting.group_size
            groups.add(module.weight_group_size)
    if activations is not None:
        with torch.no_grad(), Calibration(momentum=0.9):
            for example in calib:
                net(**{k: v.unsqueeze(0) for k, v in example.items()})
    freeze(net)
    options["details"] = (
        "qint8 per-channel absmax"
        if setting.weight_bits == 8
        else (f"groups of {sorted(groups)}" if None not in groups else "per channel")
    )
    if activations is not None:
        options["details"] += ", static per-tensor qint8 activations (module outputs)"
    return net


def save(net, out_dir: Path) -> None:
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # tied weights (word embeddings / LM head) once, as save_pretrained does
    seen: dict[int, str] = {}
    for key in list(state):
        ptr = state[key].data_ptr() if state[key].numel() else None
        if ptr is not None and ptr in seen:
            del state[key]
        elif ptr is not None:
            seen[ptr] = key
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "quantization_map.json").write_text(json.dumps(quantization_map(net)))
    net.config.save_pretrained(out_dir)
