"""Function-preserving transforms applied to the FP model before quantization (issue 19: activation outliers)."""

from .input_op import InputTransform


def apply_transforms(*args, **kwargs):
    # Late: loading a checkpoint imports this package (hf/ and models/ need `InputTransform`) and must not load
    # the transform stage (tests/test_import_rules.py).
    from .apply import apply_transforms as apply

    return apply(*args, **kwargs)


__all__ = ["InputTransform", "apply_transforms"]
