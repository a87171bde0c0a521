"""The calibration engine: the sequential block pipeline, block reconstruction and its rounding strategies,
calibration data, activation caches, observation passes, Fisher weights, GPTQ initialisation, offload and
resume. Only `hf_qlimit.quantize` enters it."""
