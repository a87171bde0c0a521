"""hf_qlimit's own perplexity of a model on llama-perplexity's windows, in a child process.

llama-perplexity tokenizes the whole text (with BOS when the file says so), cuts chunks of `ctx` tokens, puts BOS
first in each chunk when the vocabulary adds one, and scores the second half: positions ctx/2 .. ctx-2 predict the
next token. The same here with the HF tokenizer, so that the two perplexities of one model can be compared.

    python -m benchmarks.gguf.hf_windows --model FOLDER --text test.txt --chunks 16 --ctx 512 [--bos]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks import common


def windows(tokenizer, text: str, chunks: int, ctx: int, bos: bool) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos:
        ids = [tokenizer.bos_token_id, *ids]
    n = min(chunks, len(ids) // ctx)
    out = torch.tensor(ids[: n * ctx]).reshape(n, ctx)
    if bos:
        out[:, 0] = tokenizer.bos_token_id
    return out


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor) -> float:
    first = chunks.shape[1] // 2
    nll, count = 0.0, 0
    for chunk in chunks:
        logits = model(chunk.unsqueeze(0)).logits[0, first:-1].double()
        targets = chunk[first + 1 :]
        nll -= torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--bos", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_qlimit  # noqa: F401  (loads hf_qlimit checkpoints)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    chunks = windows(tokenizer, Path(args.text).read_text(encoding="utf-8"), args.chunks, args.ctx, args.bos)
    start = time.perf_counter()
    ppl = perplexity(model, chunks)
    common.emit_result({"model": args.model, "ppl": ppl, "chunks": len(chunks), "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
