"""An independent, slow reimplementation of the matrix definition in numpy.

Written from the definition in docs/matrix.md (not from the C++), so that the C++ and CUDA
generators are checked against something that shares no code with them. float32
arithmetic is done one IEEE operation at a time in numpy float32, in the order the
definition gives.
"""
import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
RAD_TAG, GAU_TAG = 0x52414430, 0x47415530


def philox4x32_10(counter, key):
    c0, c1, c2, c3 = (int(v) & MASK32 for v in counter)
    k0, k1 = (int(v) & MASK32 for v in key)
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def rademacher(seed, row, col):
    words = philox4x32_10((row & MASK32, row >> 32, col // 128, RAD_TAG), (seed & MASK32, seed >> 32))
    bit = (words[(col // 32) % 4] >> (col % 32)) & 1
    return np.float32(-1.0) if bit else np.float32(1.0)


f32 = np.float32


def _log(u):
    bits = np.array([u], dtype=np.float32).view(np.uint32)[0]
    e = int((bits >> 23) & 0xFF) - 127
    m = np.array([(bits & 0x007FFFFF) | 0x3F800000], dtype=np.uint32).view(np.float32)[0]
    if m > f32(1.41421356):
        m = f32(m * f32(0.5))
        e += 1
    s = f32(f32(m - f32(1)) / f32(m + f32(1)))
    s2 = f32(s * s)
    poly = f32(0.11111111)
    for coef in (0.14285715, 0.2, 0.33333334, 1.0):
        poly = f32(f32(poly * s2) + f32(coef))
    log_m = f32(f32(f32(2) * s) * poly)
    return f32(f32(f32(e) * f32(0.69314718)) + log_m)


def _box_muller(a, b):
    u1 = f32(f32((a >> 8) + 1) * f32(5.9604645e-08))
    r = np.sqrt(f32(f32(-2) * _log(u1)), dtype=np.float32)
    quarter = b >> 30
    frac = f32(f32((b >> 8) & 0x3FFFFF) * f32(2.3841858e-07))
    phi = f32(f32(frac - f32(0.5)) * f32(1.5707964))
    p2 = f32(phi * phi)
    sp = f32(2.7557319e-06)
    for coef, sign in ((1.9841270e-04, -1), (8.3333333e-03, 1), (1.6666667e-01, -1), (1.0, 1)):
        sp = f32(f32(sp * p2) + f32(coef)) if sign > 0 else f32(f32(sp * p2) - f32(coef))
    s = f32(phi * sp)
    c = f32(-2.7557319e-07)
    for coef, sign in ((2.4801587e-05, 1), (1.3888889e-03, -1), (4.1666668e-02, 1), (0.5, -1), (1.0, 1)):
        c = f32(f32(c * p2) + f32(coef)) if sign > 0 else f32(f32(c * p2) - f32(coef))
    cos_a, sin_a = [(c, s), (-s, c), (-c, -s), (s, -c)][quarter]
    return f32(r * cos_a), f32(r * sin_a)


def gaussian(seed, row, col):
    w = philox4x32_10((row & MASK32, row >> 32, col // 4, GAU_TAG), (seed & MASK32, seed >> 32))
    z = _box_muller(w[0], w[1]) + _box_muller(w[2], w[3])
    return z[col % 4]


def entry(kind, seed, row, col):
    return rademacher(seed, row, col) if kind == "rademacher" else gaussian(seed, row, col)
