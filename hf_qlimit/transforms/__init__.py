"""Function-preserving transforms applied to the FP model before quantization (issue 19: activation outliers)."""

from .input_op import InputTransform


def apply_transforms(*args, **kwargs):
    from .apply import apply_transforms as apply  # late: apply imports the pipeline's helpers

    return apply(*args, **kwargs)


__all__ = ["InputTransform", "apply_transforms"]
