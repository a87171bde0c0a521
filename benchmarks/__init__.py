"""Benchmarks of hf_qlimit on real models: each script runs the example scripts (or the library) in subprocesses,
keeps each run's results under benchmarks/out/ and writes its table between markers into a docs page.

Run them as modules from the repository root, e.g. `python -m benchmarks.glue.table --help`:

- `glue/`: MiniLM on GLUE (method tables, seed study, outlier ablation, reconstruction convergence and cost,
  mixed precision);
- `squad/`: MiniLM on SQuAD v1.1;
- `lm/`: SmolLM2 perplexity (method table, ablation, proxy, attention sink, mixed precision, GGUF grid);
- `deploy/`: packed-weight inference, decode matmul shapes, quantization under disk offload;
- `peers/`: hf_qlimit against other quantization tools, each in its own virtual environment.

`common.py` holds what they share.
"""
