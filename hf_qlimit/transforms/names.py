"""The names `QLimitConfig.transforms` accepts, and their parser.

Kept apart from `apply.py` so that the config can check the names when it is built without importing the
transform stage, which loading a checkpoint must not load (tests/test_import_rules.py).
"""

from __future__ import annotations

from collections.abc import Sequence

CHANNEL = ("smoothquant", "os_plus")
ROTATIONS = ("hadamard_down", "hadamard_inputs")
DEFAULT_ALPHA = 0.5


def parse_transform(name: str) -> tuple[str, float | None]:
    """ "smoothquant@0.75" -> ("smoothquant", 0.75); raises ValueError on an unknown name or a bad α."""
    base, _, arg = str(name).partition("@")
    if base not in CHANNEL + ROTATIONS:
        raise ValueError(f"Unknown transform {name!r}; known: {list(CHANNEL + ROTATIONS)} (channel ones take '@α').")
    if not arg:
        return base, (DEFAULT_ALPHA if base in CHANNEL else None)
    if base not in CHANNEL:
        raise ValueError(f"The transform {base!r} takes no argument, got {name!r}.")
    try:
        alpha = float(arg)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"The migration strength α of {name!r} must be a number in [0, 1].")
    return base, alpha


def check_transforms(names: Sequence[str] | None) -> list[tuple[str, float | None]]:
    """The parsed (name, α) of every transform; at most one channel transform."""
    parsed = [parse_transform(n) for n in names or ()]
    if sum(base in CHANNEL for base, _ in parsed) > 1:
        raise ValueError(f"At most one channel transform ({' or '.join(CHANNEL)}) per model, got {list(names)}.")
    return parsed
