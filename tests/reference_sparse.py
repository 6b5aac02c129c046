"""An independent, slow reimplementation of the sparse matrix definition (kind="sparse").

Written from the definition in docs/matrix.md, in plain Python integers, sharing no code with
the C++ (only the Philox of reference_matrix.py, itself checked against published vectors).
"""
import numpy as np

from reference_matrix import MASK32, philox4x32_10

SIGN_TAG, PERM_TAG = 0x534A5330, 0x534A5030


def group(l, k, c):
    """(start, size) of column group l."""
    start = l * k // c
    return start, (l + 1) * k // c - start


def _mix(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def sigma(seed, block, l, m, x):
    """The keyed permutation sigma_{l, block} of [0, m), applied to x."""
    keys = philox4x32_10((block & MASK32, block >> 32, l, PERM_TAG), (seed & MASK32, seed >> 32))
    bits = max(2, (m - 1).bit_length() + ((m - 1).bit_length() & 1))
    h = bits // 2
    mask = (1 << h) - 1
    while True:
        left, right = x >> h, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        x = (left << h) | right
        if x < m:
            return x


def sign(seed, row, l):
    words = philox4x32_10((row & MASK32, row >> 32, 0, SIGN_TAG), (seed & MASK32, seed >> 32))
    return -1.0 if (words[l // 32] >> (l % 32)) & 1 else 1.0


def column(seed, row, l, k, c):
    start, m = group(l, k, c)
    return start + sigma(seed, row // m, l, m, row % m)


def matrix(n, k, c, seed=0, feature_offset=0):
    """Rows feature_offset .. feature_offset + n - 1 of R (entries 0, +-1), float64."""
    out = np.zeros((n, k))
    for r in range(n):
        row = feature_offset + r
        for l in range(c):
            out[r, column(seed, row, l, k, c)] = sign(seed, row, l)
    return out
