"""Counter-based, reproducible random numbers computed on device.

A value depends only on (seed, counter, salt, column) through an integer hash,
so a seeded request draws the same numbers whatever batch or row it is in, and
nothing needs a stateful generator (safe inside CUDA graphs, no host sync).

All hashing is 32-bit arithmetic carried in int64 tensors whose values stay in
[0, 2**32): products are kept below 2**63 (see _mul_mod32) and right shifts
only ever see non-negative values.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK32 = 0xFFFFFFFF
_TOP_BIT32 = 1 << 31
_GOLDEN32 = 0x9E3779B9  # 2**32 / golden ratio, a Weyl-sequence increment
_UNIFORM_BITS = 23  # (2k + 1) / 2**24 with k < 2**23 is exact in float32 and lies in (0, 1)

IntLike = int | torch.Tensor


class RandomStream(IntEnum):
    """Salts that keep independent uses of the same (seed, counter) apart."""

    SAMPLE = 1  # plain next-token sampling (non-speculative decode, prefill)
    DRAFT = 2  # the draft model's proposals
    ACCEPT = 3  # acceptance tests during verification
    RECOVER = 4  # recovered / bonus token during verification


def _mul_mod32(x: IntLike, constant: int) -> IntLike:
    """(x * constant) mod 2**32 for x in [0, 2**32) and constant in [0, 2**32),
    without int64 overflow: x * c < 2**63 when c < 2**31, and for larger c the
    top bit is split off, x * 2**31 mod 2**32 being (x & 1) << 31."""
    if constant < _TOP_BIT32:
        return (x * constant) & _MASK32
    return (x * (constant - _TOP_BIT32) + ((x & 1) << 31)) & _MASK32


def _mix32(x: IntLike) -> IntLike:
    """A bijective 32-bit avalanche hash (xorshift-multiply, 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = _mul_mod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_mod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _low_high_words(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit halves of an int64, each as a value in [0, 2**32)."""
    # `>>` is arithmetic on negative int64; the mask keeps just the high word's bits.
    return x & _MASK32, (x >> 32) & _MASK32


def _row_hash(seed: torch.Tensor, counter: torch.Tensor, salt: int) -> torch.Tensor:
    """Absorb salt, seed and counter into one 32-bit state per element.

    The counter's low word goes in last through a bijection, so for one (seed,
    salt) the counters 0 .. 2**32 - 1 all get distinct states (no two positions
    of a request ever share their random numbers).
    """
    seed_low, seed_high = _low_high_words(seed)
    counter_low, counter_high = _low_high_words(counter)
    state = _mix32((salt & _MASK32) ^ _GOLDEN32)
    for word in (seed_low, seed_high, counter_high, counter_low):
        state = _mix32(state ^ word)
    return state


def uniform_from_counters(
    seed: torch.Tensor, counter: torch.Tensor, salt: int, n: int
) -> torch.Tensor:
    """Uniform float32 numbers strictly inside (0, 1).

    seed, counter: int64 tensors of broadcastable shapes (typically [B]; the
    counter is usually the token position). Returns shape broadcast(seed, counter)
    + [n]; column j is a fresh stream for each (seed, counter, salt).
    """
    return uniform_at_columns(seed, counter, salt, torch.arange(n, device=seed.device, dtype=torch.int64))


def uniform_at_columns(
    seed: torch.Tensor, counter: torch.Tensor, salt: int, columns: torch.Tensor
) -> torch.Tensor:
    """uniform_from_counters' numbers at the given columns only: columns int64 [..., W] (or [W])
    broadcast against broadcast(seed, counter) + [1]; column j gets the value column j has there."""
    seed, counter = torch.broadcast_tensors(seed.long(), counter.long())
    state = _row_hash(seed, counter, salt).unsqueeze(-1)  # [..., 1]
    column_keys = _mix32(_mul_mod32(columns.long(), _GOLDEN32))  # [..., W]
    bits = _mix32(state ^ column_keys) >> (32 - _UNIFORM_BITS)  # [..., W] in [0, 2**23)
    return (bits * 2 + 1).to(torch.float32) * 2.0 ** -(_UNIFORM_BITS + 1)
