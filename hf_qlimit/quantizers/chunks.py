"""Row chunks of a weight matrix: the elementwise work on a large weight (an LM head, an MLP matrix being
reconstructed) runs a slab of rows at a time, so its float temporaries never exist whole."""

from __future__ import annotations

from collections.abc import Iterator

ROW_CHUNK = 1 << 22  # weight elements handled at a time when a whole matrix need not be in float at once
# ... and in the elementwise loops of every reconstruction iteration, whose temporaries add to its peak
TEMP_CHUNK = 1 << 20


def row_slices(rows: int, cols: int, temporaries: bool = False) -> Iterator[slice]:
    """Consecutive row ranges of a (rows, cols) matrix, each of about ROW_CHUNK (TEMP_CHUNK) elements, at
    least one row."""
    step = max(1, (TEMP_CHUNK if temporaries else ROW_CHUNK) // cols)
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))
