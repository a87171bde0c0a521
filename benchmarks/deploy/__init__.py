"""Deployment: packed W4 inference against FP (`packed`), its decode matmuls alone (`decode_shapes`), and
quantizing a model larger than memory under disk offload (`offload`)."""
