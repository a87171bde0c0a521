"""Weight-only matmuls on packed integer weights, through torch's own int4 / int8 kernels.

hf_qlimit's frozen format is w = (q − z)·s with unsigned codes q (LSB-first packed bytes), a float scale and a
uint8 zero point per output row and group. The kernels want other layouts:

- int4 (`_weight_int4pack_mm_for_cpu`, CUDA `_weight_int4pack_mm`): a device- and ISA-specific tiled layout made
  by `_convert_weight_to_int4pack*`, groups of 32/64/128/256 inputs, and w = (q − 8)·s + m per group. So
  m = (8 − z)·s. Scales and m share the activation dtype, bfloat16: fp32 activations work on CPU but run far
  slower than a dense fp32 matmul, which would defeat the point.
- int8 (`_weight_int8pack_mm`, CPU and CUDA): int8 codes c, one scale per output row, y = x·(c·s)ᵀ. With
  c = q − 128, w = s·c + s·(128 − z): the second term is a per-row constant times the sum of the inputs of the
  group. Grouped weights run one kernel call per group; a grouped 8-bit LM head still beats its fp32 matmul.

The timings behind both choices are in docs/results/deploy.md ("Why bfloat16 and per-group int8 calls").

The kernel layouts are not saved: `unpack_*` turns them back into hf_qlimit's codes (exactly) for saving.
Everything here works on one weight at a time; `QuantLinear` decides when to use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_codes, unpack_codes

INT4_GROUPS = (256, 128, 64, 32)  # group sizes both int4 kernels take
KERNEL_DTYPE = torch.bfloat16  # activations, scales and offsets of the kernel calls
_UNPACK_ROWS = 256  # identity rows per call when reading a tiled int4 weight back


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@dataclass
class KernelPlan:
    """How one weight runs: `kind` "int4" or "int8", and the group size the kernel sees."""

    kind: str
    group: int


def plan(bits: int, rows: int, cols: int, group_size: int | None, device: torch.device) -> KernelPlan | None:
    """The kernel that can run a (rows, cols) weight of `bits` with `group_size` on `device`, or None."""
    if device.type not in ("cpu", "cuda"):
        return None
    groups = 1 if group_size is None or group_size >= cols else cols // group_size
    group = cols // groups
    if bits == 4:
        op = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
        if not _has_op(op) or cols % 2:
            return None
        if groups == 1:  # one scale per row: repeat it over the largest group size the kernel takes
            group = next((g for g in INT4_GROUPS if cols % g == 0), 0)
        if group not in INT4_GROUPS or cols % group:
            return None
        if device.type == "cuda" and (rows % 8 or cols % 32):  # tinygemm's tile constraints
            return None
        return KernelPlan("int4", group)
    # the CPU int8 kernel reads past the end of rows whose length is not a multiple of 8 (it crashes)
    if bits == 8 and _has_op("_weight_int8pack_mm") and groups * group == cols and group % 8 == 0:
        return KernelPlan("int8", group)
    return None


def _inner_k_tiles(cols: int) -> int:
    return next(t for t in (8, 4, 2) if cols % (t * 16) == 0)


def _expand_groups(t: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """(rows, groups) -> (rows, cols // group): a per-row value repeated when the kernel wants smaller groups."""
    return t.repeat_interleave(cols // group // t.shape[1], dim=1)


def prepare_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int, group: int):
    """(kernel weight, scales-and-offsets (cols/group, rows, 2)) from hf_qlimit's packed 4-bit rows."""
    rows = scale.shape[0]
    codes = unpack_codes(packed.reshape(rows, -1), 4, cols)
    if packed.device.type == "cpu":
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:  # CUDA takes two codes per byte, the first one in the high nibble
        pairs = codes.reshape(rows, cols // 2, 2)
        weight = torch.ops.aten._convert_weight_to_int4pack((pairs[..., 0] << 4) | pairs[..., 1], _inner_k_tiles(cols))
    s = _expand_groups(scale.float(), cols, group)
    offset = (8 - _expand_groups(zero.float(), cols, group)) * s
    return weight, torch.stack([s.t(), offset.t()], dim=-1).to(KERNEL_DTYPE).contiguous()


def _int4_mm(x2d: torch.Tensor, weight: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    if x2d.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, weight, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x2d, weight, group, sz)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, sz: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    return _int4_mm(x2d, weight, group, sz).reshape(*x.shape[:-1], rows)


def unpack_int4(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """hf_qlimit's packed rows back from a kernel weight: x = I with s = 1 and m = 8 reads every code q exactly
    (small integers are exact in bfloat16), whatever the device's tiling."""
    group = next(g for g in INT4_GROUPS if cols % g == 0)
    sz = torch.empty(cols // group, rows, 2, dtype=KERNEL_DTYPE, device=weight.device)
    sz[..., 0], sz[..., 1] = 1, 8
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    for start in range(0, cols, _UNPACK_ROWS):
        stop = min(cols, start + _UNPACK_ROWS)
        eye = torch.zeros(stop - start, cols, dtype=KERNEL_DTYPE, device=weight.device)
        eye[:, start:stop].fill_diagonal_(1)
        codes[:, start:stop] = _int4_mm(eye, weight, group, sz).t().to(torch.uint8)
    return pack_codes(codes, 4).reshape(-1)


def prepare_int8(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int, group: int):
    """(int8 codes (groups, rows, group), scales (groups, rows), offsets (groups, rows) or None if symmetric)."""
    rows, groups = scale.shape
    # q − 128, written straight into the kernel's (groups, rows, group) order: no second full-size copy
    weight = torch.empty(groups, rows, group, dtype=torch.int8, device=packed.device)
    torch.bitwise_xor(packed.reshape(rows, groups, group).permute(1, 0, 2), 0x80, out=weight.view(torch.uint8))
    offset = None
    if bool((zero != 128).any()):
        offset = ((128 - zero.float()) * scale.float()).t().contiguous()  # fp32: added after the kernel
    return weight, scale.t().to(KERNEL_DTYPE).contiguous(), offset


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    groups, rows, group = weight.shape
    x2d = x.reshape(-1, x.shape[-1])
    xb = x2d.to(KERNEL_DTYPE)
    if groups == 1:
        out = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), weight[0], scales[0]).float()
    else:
        xg = xb.reshape(-1, groups, group)
        out = torch.ops.aten._weight_int8pack_mm(xg[:, 0].contiguous(), weight[0], scales[0]).float()
        for g in range(1, groups):
            out += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), weight[g], scales[g])
    if offset is not None:
        out += x2d.float().reshape(-1, groups, group).sum(-1) @ offset
    return out.reshape(*x.shape[:-1], rows)


def unpack_int8(weight: torch.Tensor) -> torch.Tensor:
    groups, rows, group = weight.shape
    return (weight.permute(1, 0, 2).reshape(rows, groups * group).view(torch.uint8) ^ 0x80).reshape(-1)


def prepare(
    chosen: KernelPlan, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight, scales, offset or None) of hf_qlimit's packed rows in the layout of `chosen`'s kernel."""
    if chosen.kind == "int4":
        return (*prepare_int4(packed, scale, zero, cols, chosen.group), None)
    return prepare_int8(packed, scale, zero, cols, chosen.group)


def linear(
    chosen: KernelPlan,
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    offset: torch.Tensor | None,
    rows: int,
) -> torch.Tensor:
    """x · Wᵀ (no bias) through `chosen`'s kernel, in x's dtype."""
    if chosen.kind == "int4":
        return int4_linear(x, weight, scales, chosen.group, rows).to(x.dtype)
    return int8_linear(x, weight, scales, offset).to(x.dtype)


def unpack(chosen: KernelPlan, weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """hf_qlimit's flat packed codes back from `chosen`'s layout, exactly."""
    return unpack_int4(weight, rows, cols) if chosen.kind == "int4" else unpack_int8(weight)
