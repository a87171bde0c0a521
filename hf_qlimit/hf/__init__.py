"""The transformers glue: the `HfQuantizer` that `from_pretrained` uses and the module surgery that swaps
Linears, Embeddings and attention for their quantized counterparts. Never imports the calibration engine."""
