"""Distinct uniform bit strings, vectorized.

Small spaces (up to 2**22 strings, or at most 4x the request) are sampled without replacement by index.
Larger ones are drawn as packed random bytes; duplicate rows are rejected and the deficit topped up.
"""

from __future__ import annotations

import math

import numpy as np

_ENUMERATE_MAX_STRINGS = 2**22


def _support_sum(codes: np.ndarray, support: np.ndarray) -> np.ndarray:
    """sum_{i in S} x_i for integer codes (x_i = bit i) or packed little-endian byte rows."""
    total = np.zeros(len(codes), dtype=np.int64)
    for i in support:  # k vectorized passes; never a loop over examples
        bit = (codes >> i) & 1 if codes.ndim == 1 else (codes[:, i // 8] >> (i % 8)) & 1
        total += bit
    return total


def _first_unique(rows: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct byte row, in their original order."""
    if rows.shape[1] <= 8:
        padded = np.zeros((len(rows), 8), dtype=np.uint8)
        padded[:, : rows.shape[1]] = rows
        keys = padded.view("<u8").ravel()
    else:
        keys = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    ordered = np.sort(keys)
    if (ordered[1:] != ordered[:-1]).all():  # the common case for large n: nothing to reject
        return np.arange(len(rows))
    order = np.argsort(keys)
    starts = np.flatnonzero(np.r_[True, keys[order[1:]] != keys[order[:-1]]])
    # Smallest index per group: independent of which (unstable, CPU-dispatched) sort numpy uses.
    return np.sort(np.minimum.reduceat(order, starts))


def sample_bit_strings(
    rng: np.random.Generator, n: int, total: int, exclude_sum: int | None = None, support=()
) -> np.ndarray:
    """Draws `total` distinct uniform bit strings of length `n`.

    Args:
        rng (`np.random.Generator`): source of randomness.
        n (`int`): string length.
        total (`int`): number of distinct strings (must not exceed the space; see `validate_task_args`).
        exclude_sum (`int`, *optional*): reject strings whose bits on `support` sum to this value (ties).
        support (`Sequence[int]`): indices used by `exclude_sum`.

    Returns:
        `np.ndarray` of shape `(total, n)` and dtype int8, rows in random order.
    """
    support = np.asarray(support, dtype=np.int64)
    if 2**n <= max(_ENUMERATE_MAX_STRINGS, 4 * total):  # sample indices without replacement
        if exclude_sum is None:
            codes = rng.choice(2**n, size=total, replace=False)
        else:
            pool = np.arange(2**n, dtype=np.int64)
            pool = pool[_support_sum(pool, support) != exclude_sum]
            codes = rng.choice(pool, size=total, replace=False)
        return ((codes[:, None] >> np.arange(n)) & 1).astype(np.int8)

    width, tail = (n + 7) // 8, n % 8
    accept = 1.0 if exclude_sum is None else 1 - math.comb(len(support), exclude_sum) / 2 ** len(support)
    rows = np.empty((0, width), dtype=np.uint8)
    while len(rows) < total:  # a few rounds: duplicates are rare when 4 * total < 2**n
        draw = int((total - len(rows)) / accept * 1.05) + 64
        new = rng.integers(0, 256, size=(draw, width), dtype=np.uint8)
        if tail:
            new[:, -1] &= (1 << tail) - 1  # canonical padding bits, so byte rows compare as strings
        if exclude_sum is not None:
            new = new[_support_sum(new, support) != exclude_sum]
        rows = np.concatenate([rows, new])
        rows = rows[_first_unique(rows)]
    return np.unpackbits(rows[:total], axis=1, count=n, bitorder="little").view(np.int8)
