"""AutoRound worker (Intel `auto-round`): SignRound weight-only quantization of SmolLM2, saved in its own formats.

AutoRound tunes, block by block, a rounding offset V in [-0.5, 0.5] per weight and a min / max scale factor per
group (`enable_minmax_tuning`) with signed gradient descent (SignSGD, linearly decayed lr), so that the quantized
block's output matches the FP block's output on the calibration windows (MSE). Each block sees the previous
quantized blocks' outputs (`enable_quanted_input`), and the parameters of the iteration with the lowest loss are
kept (best MSE; with 1 iteration that is the starting min-max RTN grid). After `quantize()` every Linear of the
blocks holds its dequantized weight (scale * (q - zero), fp16 scales): the real quantized weights, on which the
worker measures the metric; `save` packs a copy.

Set here: asymmetric int grids (`sym=False`), groups of 64, exactly the shared calibration windows (32 x 512
tokens of WikiText-2 valid, passed as tokenized samples; AutoRound masks each window's last token as its own
workaround), batch 8, seed 0, fp32 tuning (`amp=False`: this CPU has no bf16, the other tools run fp32),
`torch.compile` off (its default on Linux for >= 10 iterations; it compiles in worker processes, which breaks the
one-thread rule, and saved little here). Iterations per block: `--iters` when given (run.py passes the same count
as hf_qlimit's BRECQ / QDrop; lr is then AutoRound's default 1 / iters), otherwise AutoRound's "light" recipe
(50 iterations, lr 5e-3). lm_head stays FP32 (AutoRound's default `quant_lm_head=False`; SmolLM2 ties it to the
embedding) and the embedding is not a Linear, so both stay FP as with the other peers; but the 4-bit AutoAWQ
export writes the tied head once more, as an FP16 lm_head (+57 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers import peer_eval

ALGOS = ("autoround",)
LIGHT = {"iters": 50, "lr": 5e-3}  # auto_round.cli.main.RECIPES["light"] (its batch 8 is kept too)
BATCH_SIZE = 8
_COMPRESSORS: dict[int, Any] = {}  # id(model) -> AutoRound compressor, for save()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"auto-round": version("auto-round")}


def check(algo: str, model: str, setting: peer_eval.Setting, options: dict[str, Any]) -> None:
    if algo not in ALGOS:
        raise peer_eval.Unsupported(f"no AutoRound algorithm {algo!r} here ({ALGOS})")
    if not peer_eval.is_causal_lm(model):
        raise peer_eval.Unsupported("AutoRound's block tuning is for decoder LLMs (SmolLM2) here")
    if setting.act_bits is not None:
        raise peer_eval.Unsupported("weight-only settings only (AutoRound's W8A8 is not benchmarked here)")


def quantize(net, calib, setting: peer_eval.Setting, algo: str, model: str, options: dict[str, Any]):
    from auto_round import AutoRound, QuantizationScheme, SignRoundConfig

    iters = options.get("iters")
    lr = None if iters is not None else LIGHT["lr"]  # None: AutoRound's 1 / iters
    iters = iters if iters is not None else LIGHT["iters"]
    scheme = QuantizationScheme.from_dict(
        {
            "bits": setting.weight_bits,
            "group_size": setting.group_size or -1,
            "sym": False,
            "data_type": "int",
            "act_bits": 16,
        }
    )
    # 2-D [1, seq] input_ids per sample: AutoRound's calibration loop iterates a non-string dataset as is and
    # feeds each dict to the model (it builds the attention mask itself), so it tunes on exactly these windows.
    dataset = [{"input_ids": example["input_ids"].reshape(1, -1)} for example in calib]
    compressor = AutoRound(
        net,
        _tokenizer(net),
        scheme=scheme,
        alg_configs=SignRoundConfig(iters=iters, lr=lr),
        dataset=dataset,
        nsamples=len(calib),
        seqlen=peer_eval.LM_SEQ_LEN,
        batch_size=BATCH_SIZE,
        device_map="cpu",
        amp=False,
        enable_torch_compile=False,
        seed=peer_eval.SEED,
    )
    qnet, _ = compressor.quantize()
    _COMPRESSORS[id(qnet)] = compressor
    config = compressor.quantize_config  # iters 0 makes AutoRound switch to its RTN (no iters, no lr)
    tuned = f"SignRound {config.iters} iters/block, lr {config.lr:g}, minmax tuning" if iters > 0 else "RTN (iters 0)"
    options["details"] = (
        f"{tuned}, batch {BATCH_SIZE}, {len(calib)} samples of {peer_eval.LM_SEQ_LEN}, asymmetric int, fp32 "
        "(amp off), no torch.compile"
        + ("" if options.get("iters") is not None else "; 'light' recipe")
        + f"; saved as {_format(setting.weight_bits)}"
    )
    return qnet.float()  # no-op with amp off; guards the evaluation against a bf16 model


def _tokenizer(net) -> Any:
    """AutoRound reads the pad token from the tokenizer; the worker's tokenizer is the model folder's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(net.config._name_or_path)


def _format(bits: int) -> str:
    """The export format. AutoRound's "auto_round" sends asymmetric 4-bit to its AutoAWQ packing, whose call is
    broken in 0.16.1 (TypeError: WQLinear_GEMM got 'weight_dtype'); its plain AutoAWQ export packs the same int4
    and zero points correctly. 2 and 3 bits get the native auto_round packing."""
    return "auto_awq" if bits == 4 else "auto_round"


def save(net, out_dir: Path) -> None:
    compressor = _COMPRESSORS[id(net)]
    # inplace=False packs a deep copy, so the fake-quantized model stays intact for the evaluation that follows
    compressor.save_quantized(str(out_dir), format=_format(compressor.quantize_config.bits), inplace=False)
