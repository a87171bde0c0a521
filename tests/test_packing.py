"""Bit packing: layout, round trip on both paths (whole codes per byte, and the chunked bit map)."""

from __future__ import annotations

import pytest
import torch

from hf_qlimit.nn import packing


def test_layout_is_lsb_first():
    assert packing.pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    # 3 bits: code 0 in bits 0-2, code 1 in bits 3-5, code 2 starts at bit 6 and spills into byte 1
    assert packing.pack_codes(torch.tensor([[5, 3, 6]], dtype=torch.uint8), 3).tolist() == [[0b10011101, 0b1]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [7, 8, 33, 96])
def test_round_trip_in_small_chunks(bits, n, monkeypatch):
    monkeypatch.setattr(packing, "BIT_CHUNK", 64)  # several chunks of rows on the bit-map path
    codes = torch.randint(0, 2**bits, (13, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = packing.pack_codes(codes, bits)
    assert packed.shape == (13, packing.packed_row_bytes(n, bits))
    assert torch.equal(packing.unpack_codes(packed, bits, n), codes)
