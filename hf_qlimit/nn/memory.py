"""Giving memory back to the OS (glibc on Linux; a no-op elsewhere): after a weight changes layout, and, for the
calibration engine's offloaded runs, after each block.

Building a kernel's layout (kernels.py) reads the packed codes and makes short-lived copies (int32 codes are 8x
the packed bytes). Two things then keep resident memory that holds nothing live:

- glibc keeps freed heap blocks: its mmap threshold grows to the largest block freed so far, so later
  temporaries of that size come from the heap, and the long-lived kernel tensors allocated between them pin
  the heap so it never shrinks. `malloc_trim` hands free pages back (`trim_heap`); `bound_heap` instead keeps
  large allocations out of the heap for good.
- a checkpoint `from_pretrained` maps (safetensors mmap): the codes' pages, read once for the conversion, stay
  in the process's RSS after the codes are dropped, as the mapping lives on with the file's other tensors
  (scales, norms). `madvise(MADV_DONTNEED)` unmaps those pages; the page cache keeps them.

Both were a large part of a packed W4 model's RSS before this module: the figures are in
docs/results/deploy.md ("Where the memory went").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from functools import lru_cache

import torch

MADV_DONTNEED = 4  # Linux
MAP_FILES = "/proc/self/map_files"
TRIM_EVERY = 8 * 2**20  # bytes of temporaries between two trims: a trim walks the whole heap, so not at every free
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
HEAP_MMAP_THRESHOLD = 1 << 20  # bound_heap's threshold
_pending = 0  # bytes of temporaries freed since the last trim


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):  # musl and other libcs: nothing to trim
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def trim_heap() -> None:
    """Returns glibc's free heap pages to the OS (elsewhere the allocator's own policy applies)."""
    global _pending
    _pending = 0
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap() -> None:
    """Allocations of 1 MiB and more get their own mapping, returned to the OS when freed, from now on.

    glibc raises its mmap threshold to the largest buffer freed so far (up to 32 MiB), after which every
    activation- or chunk-sized tensor lands in the heap and fragments it, and a block's reconstruction peaks well
    above the tensors alive at any moment. The price is time (fresh pages are zeroed), so only offloaded,
    memory-bounded runs pay it; figures in docs/results/deploy.md ("Where the memory went"). Process-wide and
    permanent, like any mallopt; a no-op without glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)


def freed_temporaries(nbytes: int) -> None:
    """Notes `nbytes` of temporaries just freed; trims once enough have piled up (and at no other time, so the
    cost stays per tens of MB converted)."""
    global _pending
    _pending += nbytes
    if _pending >= TRIM_EVERY:
        trim_heap()


_mappings: list[tuple[int, int, str]] = []  # file-backed mappings, as last listed: (start, end, name)


def _list_mappings() -> None:
    global _mappings
    try:  # one entry per file-backed mapping, named "start-end" in hex; ~3 ms, so listed again only on a miss
        names = os.listdir(MAP_FILES)
    except OSError:  # no procfs, or not allowed to read it
        names = []
    _mappings = [(*(int(x, 16) for x in name.split("-")), name) for name in names]


def _file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a file (a mmap'ed checkpoint), checked against the
    current mappings: a cached entry counts only if its mapping still exists (a readlink, microseconds)."""
    for listed_again in (False, True):
        for low, high, name in _mappings:
            if low <= start and end <= high:
                try:
                    os.readlink(f"{MAP_FILES}/{name}")
                    return True
                except OSError:  # unmapped since: list again
                    break
        if not listed_again:
            _list_mappings()
    return False


def drop_file_pages(tensor: torch.Tensor) -> None:
    """Unmaps the pages of a CPU tensor that lives in a mmap'ed file, for a caller that is about to drop it.

    Safe as it is only called on codes read from a checkpoint and never written: a private file mapping's
    untouched page reads the file again if anyone still touches it. Pages shared with a neighbouring tensor
    (the first and last, partly) are kept."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    if tensor.untyped_storage().resizable():  # memory torch allocated itself: never a file mapping
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not _file_mapping(start, end):
        return
    libc.madvise(first, last - first, MADV_DONTNEED)
