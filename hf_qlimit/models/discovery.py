"""Where a model's transformer blocks are, found from the model itself.

Structure proposes: the outermost ModuleLists of same-class children that hold weight matrices, keeping only the
classes named in `_no_split_modules` when any are. One hooked forward pass then verifies: every block of a stack
runs exactly once, in order, and the stacks run one after the other (an encoder-decoder gives two: encoder, then
decoder). A stack that does not run (a vision tower on text input) is dropped; a block called more than once (one
ALBERT layer shared by every depth) is refused, since each block is calibrated once for one call site.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

_VERIFIED: weakref.WeakKeyDictionary[nn.Module, tuple[BlockStack, ...]] = weakref.WeakKeyDictionary()
_ATTENTION: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
_CALLED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class BlockStack:
    """One ordered stack of blocks: its ModuleList and that list's name in the model."""

    name: str
    blocks: nn.ModuleList = field(compare=False)

    @property
    def prefix(self) -> str:
        return self.name + "."

    def block_names(self) -> list[str]:
        return [f"{self.name}.{i}" for i in range(len(self.blocks))]


def _holds_matrices(module: nn.Module) -> bool:
    # quantized layers (a loaded checkpoint) hold their matrix as flat codes beside a weight quantizer
    return any(p.dim() >= 2 for p in module.parameters()) or any(
        hasattr(m, "weight_quantizer") for m in module.modules()
    )


def _is_candidate(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    classes = {type(child) for child in module}
    if len(classes) != 1:
        return False
    cls = next(iter(classes))
    return not cls.__name__.endswith(("Embeddings", "Embedding")) and _holds_matrices(module[0])


def structural_stacks(model: nn.Module) -> tuple[BlockStack, ...]:
    """The candidate stacks, outermost first and in module order, before any forward pass."""
    found: list[BlockStack] = []
    for name, module in model.named_modules():
        if _is_candidate(module) and not any(name.startswith(s.prefix) for s in found):
            found.append(BlockStack(name, module))
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    preferred = [s for s in found if type(s.blocks[0]).__name__ in no_split]
    return tuple(preferred or found)


def find_stacks(model: nn.Module) -> tuple[BlockStack, ...]:
    """The verified stacks when `verify_stacks` ran on this model, else the structural ones. Refuses a model
    with none."""
    stacks = _VERIFIED.get(model) or structural_stacks(model)
    if not stacks:
        raise ValueError(
            f"hf_qlimit found no transformer blocks in {type(model).__name__}: it calibrates one block (a "
            "ModuleList entry of identical layers holding weight matrices) at a time, and this model has no "
            "such list. Quantize a transformer model, or pass its blocks through a registered adapter."
        )
    return stacks


@contextmanager
def _count_calls(stacks: tuple[BlockStack, ...]) -> Iterator[list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []  # (stack, block) in call order

    def hook_for(s: int, b: int) -> Callable:
        def hook(module, args):
            calls.append((s, b))

        return hook

    handles = [
        blk.register_forward_pre_hook(hook_for(s, b)) for s, st in enumerate(stacks) for b, blk in enumerate(st.blocks)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _calls_outside(model: nn.Module, stacks: tuple[BlockStack, ...]) -> Iterator[set[str]]:
    called: set[str] = set()
    prefixes = tuple(s.prefix for s in stacks)
    handles = [
        module.register_forward_pre_hook(lambda m, a, n=name: called.add(n))
        for name, module in model.named_modules()
        if not name.startswith(prefixes)
    ]
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()


def is_called(model: nn.Module, name: str) -> bool:
    """Whether module `name` (outside the blocks) ran in the verifying forward pass; True when none was run."""
    called = _CALLED.get(model)
    return called is None or name in called


@torch.no_grad()
def verify_stacks(model: nn.Module, run_forward: Callable[[], None]) -> tuple[BlockStack, ...]:
    """Runs `run_forward` (one FP forward of the model) with the candidate blocks hooked; returns the stacks that
    ran, in the order they ran, and remembers them for `find_stacks`. Raises when the calls do not say
    "each block once, in order, one stack after the other"."""
    stacks = find_stacks(model)
    with _count_calls(stacks) as calls, _calls_outside(model, stacks) as called:
        run_forward()
    ran = sorted({s for s, _ in calls}, key=lambda s: next(i for i, c in enumerate(calls) if c[0] == s))
    for s in ran:
        got = [b for st, b in calls if st == s]
        _check_calls(model, stacks[s], got)
    order = [s for s, _ in calls]
    if order != sorted(order, key=ran.index):
        raise ValueError(
            f"The block stacks {[stacks[s].name for s in ran]} of {type(model).__name__} run interleaved; "
            "hf_qlimit reconstructs one stack after the other and cannot calibrate this model."
        )
    if not ran:
        raise ValueError(f"None of the blocks of {type(model).__name__} ({[s.name for s in stacks]}) ran.")
    verified = tuple(stacks[s] for s in ran)
    _VERIFIED[model], _CALLED[model] = verified, frozenset(called)
    return verified


def _check_calls(model: nn.Module, stack: BlockStack, got: list[int]) -> None:
    expected = list(range(len(stack.blocks)))
    if got == expected:
        return
    if len(got) > len(expected) and set(got) <= set(expected):
        raise ValueError(
            f"{type(model).__name__} calls the blocks of {stack.name!r} {len(got)} times for its "
            f"{len(expected)} weight set(s) (one layer shared across depths, as in ALBERT). hf_qlimit calibrates "
            "each block once against one call site, so it does not support shared layers."
        )
    raise ValueError(
        f"The blocks of {stack.name!r} in {type(model).__name__} ran in the order {got}, not once each in "
        f"order {expected}; hf_qlimit reconstructs blocks in their forward order and cannot calibrate this model."
    )


def remember_attention(model: nn.Module, names: list[str]) -> None:
    """The modules that called transformers' attention interface in the verifying forward pass."""
    _ATTENTION[model] = frozenset(names)


def found_attention(model: nn.Module) -> frozenset[str] | None:
    """What `remember_attention` kept for this model; None when no forward pass was probed."""
    return _ATTENTION.get(model)
