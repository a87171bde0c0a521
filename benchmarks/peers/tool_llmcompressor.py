"""llm-compressor worker: GPTQ (`GPTQModifier`), AWQ (`AWQModifier` scales, then `QuantizationModifier` rounds),
SmoothQuant + GPTQ for W8A8, and its own round to nearest (`QuantizationModifier`), all through `oneshot` on the
calibration set, saved compressed with `save_pretrained(save_compressed=True)` (compressed-tensors format).

Weight-only settings use asymmetric integer weights (as hf_qlimit and GPTQ's paper), per channel or per group;
W8A8 is llm-compressor's `W8A8` scheme: int8 per-channel weights and dynamic per-token int8 input activations.
Heads (classifier, pooler, lm_head) stay FP32, embeddings are not Linear layers and stay FP32 too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers import peer_eval

ALGOS = ("gptq", "awq", "smoothquant", "rtn")
IGNORE = {"minilm-sst2": ["classifier", "re:.*pooler.*"], "smollm2": ["lm_head"]}
# BERT is post-LayerNorm: each LayerNorm's output feeds the next Linears *and* the residual branch, so scaling a
# LayerNorm (the Llama mappings) would change the function. The one pair that commutes is value -> attention
# output dense (the attention probabilities mix tokens, not channels), as Llama's v_proj -> o_proj mapping.
BERT_MAPPINGS = [("re:.*attention.self.value$", ["re:.*attention.output.dense$"])]  # (smooth layer, balance layers)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"llmcompressor": version("llmcompressor"), "compressed-tensors": version("compressed-tensors")}


def check(algo: str, model: str, setting: peer_eval.Setting, options: dict[str, Any]) -> None:
    if algo not in ALGOS:
        raise peer_eval.Unsupported(f"no llm-compressor algorithm {algo!r} here ({ALGOS})")
    if algo == "smoothquant" and setting.act_bits is None:
        raise peer_eval.Unsupported("SmoothQuant is for weight+activation (W8A8) settings")
    if setting.act_bits not in (None, 8):
        raise peer_eval.Unsupported(f"no A{setting.act_bits} scheme")


def _config_groups(setting: peer_eval.Setting) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = (
        {"strategy": "group", "group_size": setting.group_size} if setting.group_size else {"strategy": "channel"}
    )
    weights = QuantizationArgs(num_bits=setting.weight_bits, type="int", symmetric=False, **strategy)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(algo: str, model: str, setting: peer_eval.Setting) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = IGNORE[model]
    scheme: dict[str, Any] = (
        {"scheme": "W8A8", "targets": ["Linear"]} if setting.act_bits else {"config_groups": _config_groups(setting)}
    )
    if algo == "gptq":
        return [GPTQModifier(ignore=ignore, **scheme)]
    if algo == "rtn":
        return [QuantizationModifier(ignore=ignore, **scheme)]
    if algo == "awq":  # AWQ only rescales; the quantization modifier after it rounds (AWQ + RTN, as documented)
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

        mappings = [AWQMapping(*pair) for pair in BERT_MAPPINGS] if model == "minilm-sst2" else None
        return [AWQModifier(mappings=mappings), QuantizationModifier(ignore=ignore, **scheme)]
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    mappings = [[balance, smooth] for smooth, balance in BERT_MAPPINGS] if model == "minilm-sst2" else None
    return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings), GPTQModifier(ignore=ignore, **scheme)]


def _cpu_only_pinning_fix() -> bool:
    """llm-compressor 0.14's AWQ pins its cached activations (`IntermediatesCache.pin_memory`) unconditionally,
    which raises "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning only
    speeds host-to-device copies, so without an accelerator it is made a no-op. True when patched."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return True


def quantize(net, calib, setting: peer_eval.Setting, algo: str, model: str, options: dict[str, Any]):
    from datasets import Dataset
    from llmcompressor import oneshot

    patched = algo == "awq" and _cpu_only_pinning_fix()

    dataset = Dataset.from_list([{k: v.tolist() for k, v in example.items()} for example in calib])
    max_len = peer_eval.LM_SEQ_LEN if peer_eval.is_causal_lm(model) else peer_eval.SST2_MAX_LEN
    net = oneshot(
        model=net,
        dataset=dataset,
        recipe=_recipe(algo, model, setting),
        num_calibration_samples=len(calib),
        max_seq_length=max_len,
        shuffle_calibration_samples=False,
    )
    options["details"] = "W8A8 scheme (dynamic per-token activations)" if setting.act_bits else "asymmetric int"
    if algo in ("awq", "smoothquant") and model == "minilm-sst2":
        options["details"] += "; BERT mapping value -> attention.output.dense only"
    if patched:
        options["details"] += "; AWQ's pin_memory made a no-op (it fails without an accelerator)"
    return net


def save(net, out_dir: Path) -> None:
    net.save_pretrained(out_dir, save_compressed=True)
