"""What transformers does when it loads a compressed-tensors folder, checked before the folder is written.

- Packed modules: with `pack-quantized` weights kept compressed, compressed-tensors replaces a Linear's `weight`
  by `weight_packed`, `weight_scale` and `weight_shape`. Two things in transformers' loading then fail on some
  families, found here on an empty (meta) copy of the model class built from the config to be written:
  - the weight tying table names the module's `.weight` (a tied BART's head; T5 ties its head to `shared`
    whatever the config says; a head present in the checkpoint is kept): such a module is written as its float
    weights;
  - the family's `_init_weights`, which transformers runs on every module at load, reads `.weight` itself
    (FalconLinear, ModernBERT's attention and MLP, T5's feed-forward): the folder then asks transformers to
    dequantize at load (exact; vLLM, by its docs, ignores the key).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ExportError

PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape")


def skeleton(model: nn.Module, config: dict) -> nn.Module:
    """An empty (meta) model of `model`'s class built from the `config.json` contents to be written, as
    `from_pretrained` builds it."""
    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        with torch.device("meta"):  # transformers runs no weight init on meta, as in from_pretrained
            return type(model)(type(model.config).from_dict(fields))
    except Exception as error:  # any failure: the folder's loading cannot be checked
        raise ExportError(
            f"{model.config.model_type}: could not build an empty {type(model).__name__} from the config to be "
            f"written, to check how transformers loads the folder ({type(error).__name__}: {error})."
        ) from error


def tied_modules(empty: nn.Module, names: list[str]) -> list[str]:
    """Those of the modules `names` whose `.weight` transformers' tying table names on loading."""
    tied = empty.get_expanded_tied_weights_keys(all_submodels=True)
    weights = {key.removesuffix(".weight") for pair in tied.items() for key in pair if key.endswith(".weight")}
    return [name for name in names if name in weights]


def init_reads_weight(empty: nn.Module, names: list[str]) -> str | None:
    """Why transformers' weight init fails on loading when the Linears `names` hold packed weights, or None."""
    modules = {name: empty.get_submodule(name) for name in names}
    for module in modules.values():
        shape = module.weight.shape
        del module.weight
        for extra in PACKED_NAMES:
            module.register_parameter(extra, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    try:
        empty.initialize_weights()
    except Exception as error:  # noqa: BLE001  (AttributeError where it reads `.weight`; any failure counts)
        cls = type(empty).__name__
        return f"{cls}'s weight init, which transformers runs on loading, fails on packed modules ({error})"
    return None
