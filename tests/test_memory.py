"""hf_qlimit.nn.memory: pages of dropped checkpoint codes leave the process, freed temporaries go back to the OS."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from hf_qlimit.nn import memory

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")
linux = pytest.mark.skipif(not GLIBC, reason="glibc on Linux")


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@linux
def test_dropped_pages_of_a_mapped_checkpoint_leave_the_rss_and_read_back_the_same(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "codes.safetensors"
    codes = torch.randint(0, 256, (8 * 2**20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_file({"codes": codes}, str(path))
    with safe_open(str(path), framework="pt") as f:  # the mmap backend, as `from_pretrained` reads
        mapped = f.get_tensor("codes")
    assert int(mapped.sum()) == int(codes.sum())  # every page touched
    before = _resident_kb(path)
    assert before >= 7 * 1024, "safetensors did not map the file: nothing to check"
    memory.drop_file_pages(mapped)
    assert _resident_kb(path) <= 8  # at most the partly shared first and last pages
    assert torch.equal(mapped, codes)  # still readable: the pages come back from the file


@linux
def test_memory_torch_allocated_is_left_alone():
    t = torch.arange(2**20, dtype=torch.int32)
    memory.drop_file_pages(t)
    assert torch.equal(t, torch.arange(2**20, dtype=torch.int32))


def test_heap_is_trimmed_once_enough_temporaries_were_freed(monkeypatch):
    memory.trim_heap()  # any trim starts the count again
    trim, calls = memory.trim_heap, []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or trim())
    memory.freed_temporaries(memory.TRIM_EVERY - 1)
    assert calls == []
    memory.freed_temporaries(1)
    assert calls == [1]
    memory.freed_temporaries(memory.TRIM_EVERY - 1)
    assert calls == [1]  # counted from 0 again after the trim
