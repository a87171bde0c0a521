"""Models dispatched by accelerate (`device_map=...`, disk or CPU offload): bring modules in one at a time.

Quantization replaces modules, so accelerate's per-module hooks cannot stay: `Offloader.materialize` loads a
module's offloaded weights through the hook's own weights map (accelerate's offload loader, memory-mapped),
places them on the execution device with `set_module_tensor_to_device`, and removes the hook. A model that was
never dispatched has no hooks, and materializing is then only a move to the execution device.

A finished block that came from disk goes back to disk (`Offloader.park`): its quantized tensors are written to
a safetensors file and the block gets accelerate's own offload hook over that file, so the returned model stays
offloaded, runs like any accelerate-dispatched model, and `save_pretrained` streams it shard by shard.
"""

from __future__ import annotations

import gc
import os

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import OffloadedWeightsLoader, send_to_device, set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn

from ..forward import is_dispatched
from ..nn.memory import trim_heap
from ..nn.modules import set_inference_mode
from .resume import cpu_state_dict


def _align_hook(module: nn.Module) -> AlignDevicesHook | None:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return next((h for h in hooks if isinstance(h, AlignDevicesHook)), None)


def default_device(model: nn.Module) -> torch.device:
    """Where computation happens unless asked otherwise: the model's own device, or CUDA (else CPU) if offloaded."""
    param = next(model.parameters())
    if param.device.type != "meta" and not is_dispatched(model):
        return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _ParkedHook(ModelHook):
    """Loads a whole parked module from its file for each forward, back to meta after (accelerate's disk offload).

    Not `AlignDevicesHook(place_submodules=True)`: that one drops the submodule prefix of non-persistent
    buffers (a frozen QuantLinear's `_dequantized`) and fails on them. `weights_map` is the attribute
    transformers' `save_pretrained` reads offloaded tensors through.
    """

    def __init__(self, weights_map: OffloadedWeightsLoader, execution_device: torch.device) -> None:
        self.weights_map, self.execution_device = weights_map, execution_device

    def _place(self, module: nn.Module, device: torch.device | str) -> None:
        for name in self.weights_map:
            value = None if device == "meta" else self.weights_map[name]
            set_module_tensor_to_device(module, name, device, value=value)

    def init_hook(self, module: nn.Module) -> nn.Module:
        self._place(module, "meta")
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self._place(module, self.execution_device)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module: nn.Module, output):
        self._place(module, "meta")
        trim_heap()  # the block's dequantized weights were just freed: without this glibc keeps them (see release_memory)
        return output


class Offloader:
    """Materializes modules of a (possibly dispatched) model on the execution device, on demand."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        # Tied weights (an LM head sharing the embedding) are one meta Parameter under two names: once one
        # module is materialized the other must still find the values, through the first name's weights map.
        first: dict[int, str] = {}
        self._alias: dict[str, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._alias[name] = first.setdefault(id(param), name)
        self._maps: dict[str, object] = {}
        self.parked: dict[str, _ParkedHook] = {}

    def was_offloaded(self, name: str) -> bool:
        """Whether accelerate kept (part of) the module `name` off the execution device before it was materialized."""
        return any(n == name or n.startswith(name + ".") for n in self._maps)

    def park(self, name: str, path: str | os.PathLike, write: bool = True) -> None:
        """Sends the finished module `name` to the safetensors file `path` (written unless `write=False`: a
        file of this module's state_dict already) and leaves an offload hook that loads it back per forward."""
        module = self.model.get_submodule(name)
        keys = list(module.state_dict())
        if write:
            save_file(cpu_state_dict(module), str(path))
        loader = OffloadedWeightsLoader(index={k: {"safetensors_file": str(path), "weight_name": k} for k in keys})
        hook = _ParkedHook(loader, self.device)
        set_inference_mode(module, "dequantize")  # a cached fp32 weight would outlive the hook's unloading
        add_hook_to_module(module, hook)
        self.parked[name] = hook

    def materialize(self, name: str, device: torch.device | None = None, recurse: bool = True) -> nn.Module:
        """The module `name` with its weights real and on `device` (default: the execution device).

        recurse=False handles only the module's own tensors (a container such as the decoder, whose children
        are brought in separately).
        """
        device = device or self.device
        module = self.model.get_submodule(name)
        subs = module.named_modules(prefix=name) if recurse else [(name, module)]
        for sub_name, sub in subs:
            if self._is_parked(sub_name):
                continue
            hook = _align_hook(sub)
            if hook is not None and hook.offload:
                self._maps[sub_name] = hook.weights_map
            for tensor_name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                full = f"{sub_name}.{tensor_name}" if sub_name else tensor_name
                value = self._load(full) if tensor.device.type == "meta" else None
                set_module_tensor_to_device(sub, tensor_name, device, value=value)
            if getattr(sub, "_hf_hook", None) is not None:
                remove_hook_from_module(sub)
        return module

    def _load(self, full_name: str) -> torch.Tensor:
        for candidate in dict.fromkeys([full_name, self._alias.get(full_name, full_name)]):
            module_name, _, param_name = candidate.rpartition(".")
            weights = self._maps.get(module_name)
            if weights is None:
                hook = _align_hook(self.model.get_submodule(module_name))
                weights = hook.weights_map if hook is not None and hook.offload else None
            if weights is not None:
                try:
                    return weights[param_name]
                except KeyError:
                    continue
        raise RuntimeError(f"{full_name} is on the meta device and no accelerate offload map holds its values.")

    def _is_parked(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.parked)

    def release(self) -> None:
        """Everything but the parked modules materialized on CPU; parked ones will run on CPU too."""
        cpu = torch.device("cpu")
        self.materialize("", cpu)
        for hook in self.parked.values():
            hook.execution_device = cpu
        if self.parked:  # save_pretrained reads meta tensors back through the hooks when the map says "disk"
            in_memory = [n for n, m in self.model.named_modules() if not self._is_parked(n) and _has_direct_tensors(m)]
            self.model.hf_device_map = {**dict.fromkeys(in_memory, "cpu"), **dict.fromkeys(self.parked, "disk")}
        elif hasattr(self.model, "hf_device_map"):
            del self.model.hf_device_map  # no longer dispatched: save_pretrained must not look for offloaded files


def _has_direct_tensors(module: nn.Module) -> bool:
    return any(True for _ in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def release_memory() -> None:
    """Frees what a finished block left behind, back to the OS.

    accelerate's hook removal leaves each replaced module in a reference cycle that still holds its
    memory-mapped FP weight, hence the collection; and glibc keeps freed block-sized buffers in its heap
    (its mmap threshold grows with every large free), hence the trim: without both, an offloaded run's RSS
    grows by most of a block's size per block.
    """
    gc.collect()
    trim_heap()
