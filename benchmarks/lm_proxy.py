#!/usr/bin/env python
"""A quick proxy for the SmolLM2 ablation: only the first K blocks are quantized, the rest of the model stays FP.

The blocks are reconstructed on a copy of the model cut after block K (with the MSE loss each block's
reconstruction depends only on the blocks before it, so the cut changes nothing), then put back into the full
FP model, whose perplexity is measured on the peers protocol's windows. Embeddings and head stay FP. A run costs
about K/30 of a whole-model run, which lets settings be compared before a full `lm_ablation.py` run.

    python benchmarks/lm_proxy.py --blocks 8 --bits 3 --overrides '{"scale_lr": 3e-3}' --label slr3e-3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "peers")]
import _common  # noqa: E402
import peer_eval  # noqa: E402

OUT = HERE / "out" / "lm_proxy"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--overrides", default="{}", help="QLimitConfig fields as JSON.")
    parser.add_argument("--label", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    args = parser.parse_args(argv)

    import torch

    import hf_qlimit  # noqa: F401
    from hf_qlimit import QLimitConfig

    torch.set_num_threads(args.threads)
    net, tokenizer = peer_eval.load_fp("smollm2", peer_eval.model_path("smollm2"))
    calib = peer_eval.calibration("smollm2", tokenizer)
    cut = copy.deepcopy(net)
    cut.model.layers = cut.model.layers[: args.blocks]
    cut.config.num_hidden_layers = args.blocks
    overrides = json.loads(args.overrides)
    config = QLimitConfig(weight_bits=args.bits, group_size=args.group_size, act_bits=None, first_last_bits=None,
                          **overrides)  # fmt: skip
    tick = time.perf_counter()
    cut.quantize_qlimit(calib, config)
    seconds = time.perf_counter() - tick
    for i in range(args.blocks):
        net.model.layers[i] = cut.model.layers[i]
    ppl = peer_eval.evaluate("smollm2", net, tokenizer)["ppl"]
    record = {"label": args.label, "blocks": args.blocks, "bits": args.bits, "group_size": args.group_size,
              "overrides": overrides, "ppl": ppl, "quantize_s": seconds, "threads": args.threads,
              "load": os.getloadavg()[0], "date": datetime.date.today().isoformat(), "commit": _common.commit(HERE.parent)}  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"RESULT {args.label}: ppl {ppl:.3f}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
