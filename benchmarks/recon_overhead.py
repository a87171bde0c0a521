#!/usr/bin/env python
"""Cost of one reconstruction iteration against a plain FP forward + backward of the same block.

Takes one transformer block of a model, the same calibration batch, and times
  (a) FP: block forward, sum of squares of the output, backward (no quantizers),
  (b) QDrop: `reconstruct_block`'s iteration (AdaRound weights, LSQ activations, dropping, mixing, loss, Adam).
Prints the ratio (b) / (a); the target is at most 1.5.

    python benchmarks/recon_overhead.py                         # MiniLM-SST2 from ../shared/models
    python benchmarks/recon_overhead.py --model_name_or_path PATH --seq_len 64 --batch_size 32
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from hf_qlimit import QLimitConfig
from hf_qlimit.block_inputs import capture_block_inputs, run_block
from hf_qlimit.integration import act_quantizers, convert_model, quant_state, quantized_modules
from hf_qlimit.models import get_adapter
from hf_qlimit.reconstruction import BlockData, reconstruct_block

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time them, not their launches
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(REPO.parent / "shared" / "models" / "minilm-l6-sst2"))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device = torch.device(args.device)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).eval().requires_grad_(False)
    model.to(device)
    fp_model = copy.deepcopy(model)
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    adapter = get_adapter(model)
    config = QLimitConfig(weight_bits=4, act_bits=8, method="qdrop", iters=args.iters)
    config.layer_config = adapter.layer_config(model, config)
    convert_model(model, config.layer_config, config, frozen=False)
    for _, module in quantized_modules(model):
        module.weight_quantizer.init_range(module.weight, config.lp_norm)
    block = adapter.blocks(model)[1]
    with quant_state(model, weights=False, acts=False):
        hidden, inputs = capture_block_inputs(model, adapter.blocks(model)[0], [batch], device)
        fp_out = run_block(block, hidden, inputs, device)
    with quant_state(block, weights=True, acts=True):
        for q in act_quantizers(block):
            q.observe()
        run_block(block, hidden, inputs, device)
        for q in act_quantizers(block):
            q.finish_observing(config.lp_norm)
    data = BlockData(hidden, hidden, fp_out, inputs, [batch["attention_mask"].bool()])

    # (a) the same block in FP: forward and backward through its weights
    fp_block = adapter.blocks(fp_model)[1].requires_grad_(True)
    args_, kwargs = inputs.get(0, device)
    x = hidden[0].to(device).clone().requires_grad_(True)

    def fp_step() -> None:
        out = fp_block(x, *args_, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()

    fp_seconds = _time(fp_step, args.iters, device)
    _sync(device)
    start = time.perf_counter()
    reconstruct_block(block, data, config, device, desc="timing")
    _sync(device)
    recon_seconds = (time.perf_counter() - start) / args.iters
    print(
        f"block of {type(model).__name__}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
        f"{device.type} {_device_name(device)}: FP fwd+bwd {1000 * fp_seconds:.1f} ms, QDrop iteration "
        f"{1000 * recon_seconds:.1f} ms, ratio {recon_seconds / fp_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
