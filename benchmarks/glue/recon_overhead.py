"""Cost of one reconstruction iteration against a plain FP forward + backward of the same block.

Takes one transformer block of a model, the same calibration batch, and times
  (a) FP: block forward, sum of squares of the output, backward (no quantizers),
  (b) one iteration of `reconstruct_block` (AdaRound weights, LSQ activations, for QDrop also dropping and
      mixing, loss, Adam): the time of a run of `--iters` + `--extra_iters` iterations minus that of a run of
      `--iters`, divided by `--extra_iters`, so that the once-per-block work (AdaRound's initialisation, hard
      rounding) is left out.
Prints the ratio (b) / (a) per method; the target is at most 1.5. Rounds alternate FP and reconstruction runs
(medians over `--rounds`), so that a machine shared with other jobs slows both alike.

The table goes between `<!-- recon-overhead:start -->` and `<!-- recon-overhead:end -->` of docs/results/glue.md.

    python -m benchmarks.glue.recon_overhead                    # MiniLM-SST2 from ../shared/models
    python -m benchmarks.glue.recon_overhead --no_doc           # print the table only
    python -m benchmarks.glue.recon_overhead --model_name_or_path PATH --seq_len 64 --batch_size 32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from benchmarks import common
from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.block_inputs import capture_block_inputs, run_block
from hf_qlimit.calibration.quant_state import act_quantizers, quant_state
from hf_qlimit.calibration.reconstruction import BlockData, reconstruct_block
from hf_qlimit.hf.surgery import convert_model, quantized_modules
from hf_qlimit.models import get_adapter

DOC = common.RESULTS_DOCS / "glue.md"
MARKER = "recon-overhead"


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


def _setup(args, device: torch.device):
    """(model with quantizers, its block 1, that block's data, an FP block 1, one FP input with its arguments)."""
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).eval().requires_grad_(False)
    model.to(device)
    fp_model = copy.deepcopy(model)
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    adapter = get_adapter(model)
    # QDrop's masks included (the costlier case), as when the table was measured
    config = QLimitConfig(weight_bits=4, act_bits=8, method="qdrop", drop_prob=0.5).resolved(causal_lm=False)
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
    fp_block = adapter.blocks(fp_model)[1].requires_grad_(True)
    args_, kwargs = inputs.get(0, device)
    x = hidden[0].to(device).clone().requires_grad_(True)
    return config, block, data, fp_block, (x, args_, kwargs)


def _recon_seconds(block, data, config: QLimitConfig, method: str, iters: int, device: torch.device) -> float:
    """Wall time of a whole `reconstruct_block` of `iters` iterations, on a copy of the block."""
    config = copy.deepcopy(config)
    config.method, config.iters = method, iters
    block = copy.deepcopy(block)
    torch.manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    reconstruct_block(block, data, config, device, desc=f"{method} {iters} it")
    _sync(device)
    return time.perf_counter() - start


def measure(args, device: torch.device) -> dict[str, dict[str, float]]:
    config, block, data, fp_block, (x, args_, kwargs) = _setup(args, device)

    def fp_step() -> None:
        out = fp_block(x, *args_, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()

    results = {}
    for method in args.methods:
        fp, iteration = [], []
        for _ in range(args.rounds):
            fp.append(_time(fp_step, args.extra_iters, device))
            short = _recon_seconds(block, data, config, method, args.iters, device)
            long = _recon_seconds(block, data, config, method, args.iters + args.extra_iters, device)
            iteration.append((long - short) / args.extra_iters)
        fp_s, it_s = statistics.median(fp), statistics.median(iteration)
        results[method] = {"fp_ms": 1000 * fp_s, "iteration_ms": 1000 * it_s, "ratio": it_s / fp_s}
        print(f"{method}: FP fwd+bwd {1000 * fp_s:.1f} ms, iteration {1000 * it_s:.1f} ms, ratio {it_s / fp_s:.2f}")
    return results


def render(results: dict[str, dict[str, float]], args, device: torch.device) -> str:
    name = Path(args.model_name_or_path).name
    lines = [
        (
            f"One block of {name}, batch {args.batch_size} x {args.seq_len} tokens, W4A8 (inputs of every Linear "
            "and of the attention matmuls quantized)."
        ),
        "",
        "| Method | FP fwd+bwd (ms) | reconstruction iteration (ms) | ratio (target <= 1.5) |",
        "|---|---:|---:|---:|",
    ]
    for method, r in results.items():
        lines.append(f"| {method} | {r['fp_ms']:.1f} | {r['iteration_ms']:.1f} | {r['ratio']:.2f} |")
    lines += [
        "",
        (
            f"Measured {datetime.date.today().isoformat()} on {common.machine(args.threads)}, on {device.type}; "
            f"medians of {args.rounds} rounds, iteration time from runs of {args.iters} and "
            f"{args.iters + args.extra_iters} iterations (the once-per-block setup cancels out). Generated by "
            "`python -m benchmarks.glue.recon_overhead`."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(common.SHARED / "models" / "minilm-l6-sst2"))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["brecq", "qdrop"], choices=["brecq", "qdrop"])
    parser.add_argument("--iters", type=int, default=10, help="Iterations of the shorter run.")
    parser.add_argument("--extra_iters", type=int, default=40, help="Further iterations of the longer run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    results = measure(args, device)
    common.publish(render(results, args, device), MARKER, common.doc_target(args), "glue.recon_overhead")


if __name__ == "__main__":
    main()
