"""Orthonormal Hadamard matrices of many sizes, built deterministically (nothing to save: rebuilt from the size).

n = 2^k · m: Sylvester's doubling gives the 2^k part; m = q + 1 for a prime q ≡ 3 (mod 4) comes from Paley's
first construction (quadratic residues mod q). Their Kronecker product is a Hadamard matrix of order n; scaled by
1/√n it is orthogonal. Sizes with no such factorisation fall back to a block-diagonal Hadamard (still
orthogonal, mixing channels only within each block).
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (entries ±1), q prime, q ≡ 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    jacobsthal = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Q[i, j] = χ(j − i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)  # skew-symmetric S + I: (S + I)(S + I)ᵀ = (q + 1)·I


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _factor(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k · m and m = 1 or a Paley order; the largest power of two first."""
    power = n & -n
    while power >= 1:
        m = n // power
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return power, m
        power //= 2
    return None


@functools.lru_cache(maxsize=16)
def _hadamard64(n: int) -> torch.Tensor:
    factors = _factor(n)
    if factors is not None:
        power, m = factors
        h = _sylvester(power) if m == 1 else torch.kron(_paley(m - 1), _sylvester(power))
        return h / math.sqrt(n)
    block = n & -n  # block-diagonal fallback on the largest power of two dividing n
    if block == 1:
        raise ValueError(f"No Hadamard rotation for {n} channels (odd): use another transform for this layer.")
    return torch.block_diag(*[_hadamard64(block)] * (n // block))


def _butterflies(x: torch.Tensor) -> torch.Tensor:
    """x · S along the last dim, S the Sylvester matrix of that (power-of-two) size, in log2(size) passes."""
    lead, size = x.shape[:-1], x.shape[-1]
    h = 1
    while h < size:  # blocks of 2h: (a, b) -> (a + b, a − b), Sylvester's doubling
        pairs = x.reshape(*lead, size // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, size)
        h *= 2
    return x


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x · R with R = hadamard(n) along the last dim, in O(n log n) where n factorises (the online op).

    R = (P ⊗ S) / √n with P the Paley part (m x m) and S Sylvester's (2^k): a token viewed as an m x 2^k matrix X
    becomes Pᵀ X S (the block-diagonal fallback is X S on its blocks).
    """
    n = x.shape[-1]
    factors = _factor(n)
    power, m = factors if factors is not None else (n & -n, n // (n & -n))
    y = x.reshape(*x.shape[:-1], m, power)
    if power <= _DENSE_MAX:  # a small dense matmul beats log2(power) passes of butterflies on a CPU
        y = torch.matmul(y, _sylvester_cached(power, x.dtype, x.device))
    else:
        y = _butterflies(y)
    if factors is not None and m > 1:
        y = torch.matmul(_sylvester_cached(-m, x.dtype, x.device), y)  # Pᵀ
    return (y * (1.0 / math.sqrt(n if factors is not None else power))).reshape(x.shape)


_DENSE_MAX = 256


@functools.lru_cache(maxsize=32)
def _sylvester_cached(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """±1 Sylvester matrix of `size`, or for -m the transposed ±1 Paley matrix of order m."""
    if size < 0:
        return (_hadamard64(-size) * math.sqrt(-size)).T.contiguous().to(dtype=dtype, device=device)
    return _sylvester(size).to(dtype=dtype, device=device)


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """An n x n orthogonal matrix R (R Rᵀ = I) whose entries all have magnitude 1/√n where n factorises."""
    return _hadamard64(n).to(dtype=dtype, device=device)
