"""The calibration engine: the sequential block pipeline, block reconstruction and its rounding strategies,
calibration data, activation caches, observation passes, Fisher weights, GPTQ initialisation, offload and
resume. Within the package only `hf_qlimit.quantize` (api.py) imports it; the forward-pass helpers it shares with
mixed precision and the transforms live in `hf_qlimit.forward` (tests/test_import_rules.py holds both)."""
