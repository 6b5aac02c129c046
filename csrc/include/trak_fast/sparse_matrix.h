// The definition of trak_fast's sparse projection matrix (kind="sparse").
//
// Like random_matrix.h (whose Philox it uses, and whose dense definitions it leaves
// alone), this header is a file format: change nothing here without changing the golden
// values in tests/test_sparse.py, and never do that.
//
// The matrix, for proj_dim k, nnz c (1 <= c <= min(64, k)) and a seed. The unscaled
// matrix R (entries 0 and +-1) has, in every row i, exactly c nonzeros, one in each of
// c column groups:
//
//   group l (0 <= l < c) = columns [start_l, start_l + m_l),
//     start_l = floor(l * k / c),   m_l = start_{l+1} - start_l   (floor(k/c) or ceil(k/c))
//
//   the l-th nonzero of row i:
//     column  col_l(i)  = start_l + sigma_{l, b}(p),   b = floor(i / m_l), p = i mod m_l
//     sign    s_l(i)    = -1 if bit (l mod 32) of word (l / 32) of
//                           Philox4x32-10((lo32(i), hi32(i), 0, 0x534A5330 "SJS0"), key)
//                         is set, +1 otherwise
//   with key = (lo32(seed), hi32(seed)).
//
// sigma_{l, b} is a keyed permutation of [0, m_l): a 4-round balanced Feistel network on
// 2h bits, 2h the smallest even number >= max(2, ceil(log2 m_l)), with cycle walking (apply
// the network again while the value is >= m_l). Its round keys are the four words of
//   Philox4x32-10((lo32(b), hi32(b), l, 0x534A5030 "SJP0"), key),
// and round r maps (L, R) -> (R, L xor (F(R xor key_r) and (2^h - 1))), where F is the
// 32-bit mixer x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16,
// and x = L * 2^h + R.
//
// So every block of m_l consecutive rows sends its l-th nonzeros to the m_l columns of
// group l, one row per column: a column gets exactly one nonzero of group l from each such
// block, and the GPU computes out[:, j] as a gather over blocks through sigma^{-1}, with no
// atomics. The projection matrix is P = R / sqrt(c).
#pragma once

#include <stdint.h>

#include "trak_fast/random_matrix.h"

namespace trak_fast {

constexpr uint32_t kSparseSignTag = 0x534A5330u;  // "SJS0"
constexpr uint32_t kSparsePermTag = 0x534A5030u;  // "SJP0"
constexpr int64_t kMaxSparseNnz = 64;

TF_HD int64_t sparse_group_start(int64_t l, int64_t k, int64_t c) { return (l * k) / c; }

// The 64 sign bits of row `row`: bit l set means s_l(row) = -1.
TF_HD uint64_t sparse_sign_bits(uint64_t seed, uint64_t row) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                  0u, kSparseSignTag, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return static_cast<uint64_t>(r.w[0]) | (static_cast<uint64_t>(r.w[1]) << 32);
}

// The Feistel permutation sigma_{l, b} of [0, m).
struct SparsePerm {
  uint32_t key[4];
  uint32_t half_bits;
  uint32_t half_mask;
  uint32_t m;
};

TF_HD SparsePerm sparse_perm(uint64_t seed, uint64_t block, uint32_t l, uint32_t m) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                                  l, kSparsePermTag, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  SparsePerm p;
  for (int t = 0; t < 4; ++t) p.key[t] = r.w[t];
  uint32_t bits = 0;
  while (bits < 32 && (uint64_t(1) << bits) < m) ++bits;  // ceil(log2 m)
  bits += bits & 1u;
  if (bits < 2) bits = 2;
  p.half_bits = bits / 2;
  p.half_mask = (1u << p.half_bits) - 1u;
  p.m = m;
  return p;
}

TF_HD uint32_t sparse_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

TF_HD uint32_t feistel_forward(const SparsePerm& p, uint32_t x) {
  uint32_t left = x >> p.half_bits, right = x & p.half_mask;
  for (int r = 0; r < 4; ++r) {
    const uint32_t next = left ^ (sparse_mix(right ^ p.key[r]) & p.half_mask);
    left = right;
    right = next;
  }
  return (left << p.half_bits) | right;
}

TF_HD uint32_t feistel_inverse(const SparsePerm& p, uint32_t y) {
  uint32_t left = y >> p.half_bits, right = y & p.half_mask;
  for (int r = 3; r >= 0; --r) {
    const uint32_t prev = right ^ (sparse_mix(left ^ p.key[r]) & p.half_mask);
    right = left;
    left = prev;
  }
  return (left << p.half_bits) | right;
}

// sigma(x) for x < m: walk the network's cycle through x until it is back in [0, m).
TF_HD uint32_t sparse_permute(const SparsePerm& p, uint32_t x) {
  do {
    x = feistel_forward(p, x);
  } while (x >= p.m);
  return x;
}

// sigma^{-1}(y) for y < m.
TF_HD uint32_t sparse_unpermute(const SparsePerm& p, uint32_t y) {
  do {
    y = feistel_inverse(p, y);
  } while (y >= p.m);
  return y;
}

// col_l(row), the column of the l-th nonzero of row `row` (slow path: one Philox per call).
TF_HD int64_t sparse_column(uint64_t seed, uint64_t row, int64_t l, int64_t k, int64_t c) {
  const int64_t start = sparse_group_start(l, k, c);
  const uint64_t m = static_cast<uint64_t>(sparse_group_start(l + 1, k, c) - start);
  const SparsePerm p = sparse_perm(seed, row / m, static_cast<uint32_t>(l), static_cast<uint32_t>(m));
  return start + sparse_permute(p, static_cast<uint32_t>(row % m));
}

}  // namespace trak_fast
