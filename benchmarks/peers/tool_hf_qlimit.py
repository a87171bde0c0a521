"""hf_qlimit worker: RTN, BRECQ and QDrop through `model.quantize_qlimit`, saved with `save_pretrained`.

Embeddings and the task / LM head are quantized to 8 bits (`first_last_bits`, the library's default); the peers
keep them in floating point, so hf_qlimit's checkpoints are the smaller ones and its metrics carry that extra error.
Weights use asymmetric grids. "fp" saves the unquantized model (the reference row). "default" is what a user gets
from `QLimitConfig(weight_bits=..., group_size=..., act_bits=...)` with nothing else set (`preset="auto"`); the
"rtn", "brecq" and "qdrop" rows pin the old `fast` preset with the iterations run.py passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers import peer_eval

ALGOS = ("fp", "default", "rtn", "brecq", "qdrop")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import hf_qlimit  # noqa: F401  (registers quantize_qlimit)

    return {"hf_qlimit": version("hf_qlimit")}


def check(algo: str, model: str, setting: peer_eval.Setting, options: dict[str, Any]) -> None:
    if algo not in ALGOS:
        raise peer_eval.Unsupported(f"hf_qlimit has no algorithm {algo!r} here ({ALGOS})")


def quantize(net, calib, setting: peer_eval.Setting, algo: str, model: str, options: dict[str, Any]):
    if algo == "fp":
        options["details"] = "FP32, not quantized"
        return net
    from hf_qlimit import QLimitConfig

    if algo == "default":
        config = QLimitConfig(weight_bits=setting.weight_bits, act_bits=setting.act_bits, group_size=setting.group_size)
        resolved = config.for_model(net)
        net.quantize_qlimit(calib, config)
        options["details"] = (
            f"default config (preset auto): {resolved.method}"
            + (f" (drop_prob {resolved.drop_prob})" if resolved.method in ("brecq", "qdrop") else "")
            + f", {resolved.iters} iters/block, "
            f"batch {resolved.batch_size}, {min(resolved.num_samples, len(calib))} samples, "
            f"init {resolved.weight_init}, range {resolved.weight_range}, rounding {resolved.rounding}"
            + (", act-order" if resolved.gptq_act_order else "")
        )
        return net
    kwargs: dict[str, Any] = {}
    if algo != "rtn" and options.get("iters") is not None:
        kwargs["iters"] = options["iters"]
    if peer_eval.is_causal_lm(model):
        kwargs.update(max_length=peer_eval.LM_SEQ_LEN, batch_size=8)
    config = QLimitConfig(
        weight_bits=setting.weight_bits,
        act_bits=setting.act_bits,
        group_size=setting.group_size,
        method=algo,
        preset="fast",
        num_samples=len(calib),
        seed=peer_eval.SEED,
        **kwargs,
    )
    net.quantize_qlimit(calib, config)
    if algo != "rtn":
        resolved = config.for_model(net)  # the preset's fields are filled once the model is known
        options["details"] = f"{resolved.iters} iters/block, batch {resolved.batch_size}"
    return net


def save(net, out_dir: Path) -> None:
    net.save_pretrained(out_dir)
