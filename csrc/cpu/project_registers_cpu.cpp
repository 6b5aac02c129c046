// The register kernel: float32 Rademacher projections, at every batch size, without tiles
// of R.
//
// For a chunk of 256 output columns, Philox gives the 256 sign bits of a row of R (two
// calls, 16 rows at a time with AVX-512, 8 with AVX2, in vector registers), kept as 16 masks of 16 columns (2 bytes per 16 entries of R,
// for a block of 256 rows: 8 KiB, in L1). Each mask becomes a vector of +-1.0 that is
// multiplied by the broadcast gradient entry g[b, i] and added into the accumulators of a
// few batch rows at once: one FMA per 16 entries of R and batch row, no float tile of R
// written or read, and no GEMM. The tile path instead pays for expanding all p x k
// entries into memory on every call, whatever B is, which dominates at small B; at large B
// its GEMM and this kernel's FMAs are both near the FMA ports' throughput.
//
// Summation order, for every output element (b, j), fixed by the shapes alone:
//
//   t = 0 (float64)
//   for each piece, in order, for each block of 256 of its rows (the last one shorter):
//     s = 0 (float32);  for i in the block, in order:  s = s + (R[i, j] < 0 ? -g[b, i] : g[b, i])
//     t = t + s
//   out[b, j] = out[b, j] + float32(scale * t)
//
// FMA(+-1, g, s) rounds once, so it equals s +- g exactly. The order depends neither on
// the thread count (threads share out whole column chunks), nor on how the batch rows are
// blocked, nor on the instruction set: the AVX-512, AVX2 + FMA and portable kernels give
// the same bits (tests/test_project_registers.py; TRAK_FAST_DISABLE_AVX512=1 and
// TRAK_FAST_DISABLE_AVX2=1 select the others). It is not the tile + GEMM path's order, so
// the two paths agree to rounding, not bitwise; every float32 Rademacher projection takes
// this kernel, whatever B (rademacher_registers_chosen), so a call gives the same bits on
// every CPU and for every thread count, and row b of project(G) is bitwise project(G[b:b+1]).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "trak_fast/random_matrix.h"

namespace trak_fast {

bool rademacher_registers_chosen() {
  const char* force = std::getenv("TRAK_FAST_CPU_KERNEL");
  if (force && force[0] != '\0' && std::strcmp(force, "auto") != 0) {
    TORCH_CHECK(std::strcmp(force, "registers") == 0 || std::strcmp(force, "tiles") == 0,
                "trak_fast: TRAK_FAST_CPU_KERNEL must be 'auto', 'registers' or 'tiles', got '",
                force, "'");
    return std::strcmp(force, "registers") == 0;
  }
  return true;
}

namespace {

constexpr int64_t kBlockRows = 256;  // rows of R per float32 partial sum
constexpr int kGroups = 16;          // 16-column sign masks per 256-column chunk
constexpr int kChunk = kGroups * 16;
static_assert(kChunk == kChunkCols && kChunk == 2 * kRademacherBlockCols,
              "a chunk of columns is 16 groups of 16, two Philox blocks");

// masks[v][r]: bit l set where R[row0 + r, col0 + 16 v + l] = -1.
using SignMasks = uint16_t[kGroups][kBlockRows];

#ifdef TRAK_FAST_X86_DISPATCH
#define TRAK_FAST_PORTABLE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TRAK_FAST_PORTABLE_CLONES
#endif

// The portable kernels are lane loops that the compiler vectorizes (AVX2 and baseline
// clones); they perform the same IEEE operations as the AVX-512 ones.

// Rows row0 .. row0 + nrows (rounded up to 16) of the masks, 16 rows at a time.
TRAK_FAST_PORTABLE_CLONES
void sign_masks_generic(uint64_t seed, uint64_t row0, int64_t nrows, uint64_t col_block,
                        SignMasks& masks) {
  const uint32_t key_lo = static_cast<uint32_t>(seed), key_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t block = static_cast<uint32_t>(col_block);
  for (int64_t r = 0; r < nrows; r += 16) {
    uint32_t w[8][16];
    for (int l = 0; l < 16; ++l) {
      const uint64_t row = row0 + static_cast<uint64_t>(r + l);
      const uint32_t lo = static_cast<uint32_t>(row), hi = static_cast<uint32_t>(row >> 32);
      const Philox4 a = philox4x32_10(lo, hi, block, kRademacherTag, key_lo, key_hi);
      const Philox4 b = philox4x32_10(lo, hi, block + 1, kRademacherTag, key_lo, key_hi);
      for (int t = 0; t < 4; ++t) {
        w[t][l] = a.w[t];
        w[4 + t][l] = b.w[t];
      }
    }
    for (int t = 0; t < 8; ++t) {
      for (int l = 0; l < 16; ++l) {
        masks[2 * t][r + l] = static_cast<uint16_t>(w[t][l]);
        masks[2 * t + 1][r + l] = static_cast<uint16_t>(w[t][l] >> 16);
      }
    }
  }
}

// kSigns.rows[byte][l] = -1 if bit l of byte is set, else +1.
struct SignRows {
  float rows[256][8];
  SignRows() {
    for (int byte = 0; byte < 256; ++byte)
      for (int l = 0; l < 8; ++l) rows[byte][l] = ((byte >> l) & 1) ? -1.0f : 1.0f;
  }
};
const SignRows kSigns;

// part[b * 256 + j] = the float32 partial sums of batch rows g[0 .. NB) over a block.
// g * (+-1) is exact, so acc + g * sign rounds exactly as the AVX-512 FMA does.
template <int NB>
inline void block_generic_rows(const float* const* g, int64_t nrows, const SignMasks& masks,
                               int ngroups, float* part) {
  for (int v = 0; v < ngroups; ++v) {
    float acc[NB][16] = {};
    for (int64_t r = 0; r < nrows; ++r) {
      const uint32_t m = masks[v][r];
      const float* lo = kSigns.rows[m & 0xFFu];
      const float* hi = kSigns.rows[m >> 8];
      for (int nb = 0; nb < NB; ++nb) {
        const float gr = g[nb][r];
        for (int l = 0; l < 8; ++l) acc[nb][l] = acc[nb][l] + gr * lo[l];
        for (int l = 0; l < 8; ++l) acc[nb][8 + l] = acc[nb][8 + l] + gr * hi[l];
      }
    }
    for (int nb = 0; nb < NB; ++nb)
      for (int l = 0; l < 16; ++l) part[nb * kChunk + 16 * v + l] = acc[nb][l];
  }
}

TRAK_FAST_PORTABLE_CLONES
void block_generic_1(const float* const* g, int64_t nrows, const SignMasks& masks, int ngroups,
                     float* part) {
  block_generic_rows<1>(g, nrows, masks, ngroups, part);
}

TRAK_FAST_PORTABLE_CLONES
void block_generic_4(const float* const* g, int64_t nrows, const SignMasks& masks, int ngroups,
                     float* part) {
  block_generic_rows<4>(g, nrows, masks, ngroups, part);
}

#ifdef TRAK_FAST_X86_DISPATCH
// AVX2 + FMA: the sign rows come from kSigns (8 lanes per load), and each FMA(+-1, g, acc)
// rounds once, like acc + g * sign in the portable loop.
//
// total[nb * 256 + 16 v0 ..] += the partial sums of batch rows g[0 .. NB) over the block,
// for the 16 NG columns of groups v0 .. v0 + NG: NB x 2 NG accumulators of 8 lanes. With
// NB = 3, NG = 2 they are 12 of the 16 ymm registers, the 3 broadcast entries of g and
// the sign row take the other 4, and each row of R costs 4 mask bytes, 4 sign rows and 3
// broadcasts (11 loads) for 12 FMAs: no spills, near the 2 FMAs per cycle of the ports.
// The accumulators live in a flat array with fully unrolled loops (a nested array of
// __m256 made GCC store every accumulator to the stack on every row). The float32 sums
// are added into the float64 totals here, in the block's order, as the other kernels do.
template <int NB, int NG>
__attribute__((target("avx2,fma"))) void block_avx2(const float* const* g, int64_t nrows,
                                                   const SignMasks& masks, int v0,
                                                   double* total) {
  constexpr int NH = 2 * NG;  // 8-lane halves of the NG groups
  __m256 acc[NB * NH];
#pragma GCC unroll 32
  for (int i = 0; i < NB * NH; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nrows; ++r) {
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) {
      const uint32_t m = masks[v0 + h / 2][r];
      const __m256 sign = _mm256_load_ps(kSigns.rows[h % 2 ? m >> 8 : m & 0xFFu]);
#pragma GCC unroll 8
      for (int nb = 0; nb < NB; ++nb)
        acc[nb * NH + h] = _mm256_fmadd_ps(sign, _mm256_broadcast_ss(g[nb] + r), acc[nb * NH + h]);
    }
  }
#pragma GCC unroll 8
  for (int nb = 0; nb < NB; ++nb) {
#pragma GCC unroll 32
    for (int h = 0; h < NH; ++h) {
      double* t = total + nb * kChunk + 16 * v0 + 8 * h;
      const __m256 a = acc[nb * NH + h];
      _mm256_storeu_pd(t, _mm256_add_pd(_mm256_loadu_pd(t), _mm256_cvtps_pd(_mm256_castps256_ps128(a))));
      _mm256_storeu_pd(t + 4, _mm256_add_pd(_mm256_loadu_pd(t + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
    }
  }
}

// Groups [v0, ngroups) for NB batch rows: passes of NG groups, then fewer for the rest.
template <int NB, int NG>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* const* g, int64_t nrows,
                                                  const SignMasks& masks, int v0, int ngroups,
                                                  double* total) {
  for (; v0 + NG <= ngroups; v0 += NG) block_avx2<NB, NG>(g, nrows, masks, v0, total);
  if constexpr (NG > 1) {
    if (v0 < ngroups) rows_avx2<NB, NG - 1>(g, nrows, masks, v0, ngroups, total);
  }
}

// Batch rows per register block of the AVX2 kernel (rows_avx2<3, 2>); 2 and 1 for the rest.
constexpr int kAvx2Rows = 3;

// total[b * 256 + j] += the block's partial sums for batch rows g[0 .. nb), nb <= 3.
__attribute__((target("avx2,fma"))) void block_rows_avx2(const float* const* g, int64_t nb,
                                                        int64_t nrows, const SignMasks& masks,
                                                        int ngroups, double* total) {
  switch (nb) {
    case 1: return rows_avx2<1, 6>(g, nrows, masks, 0, ngroups, total);
    case 2: return rows_avx2<2, 3>(g, nrows, masks, 0, ngroups, total);
    default: return rows_avx2<3, 2>(g, nrows, masks, 0, ngroups, total);
  }
}
static_assert(kAvx2Rows == 3, "block_rows_avx2 handles up to 3 rows");

bool use_avx2() {
  static const bool enabled = [] {
    const char* off = std::getenv("TRAK_FAST_DISABLE_AVX2");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           !(off && off[0] == '1');
  }();
  return enabled;
}

// One Philox4x32-10 round on 8 counters, philox_round_avx512's twin: _mm256_mul_epu32 gives
// the 32x32->64 products of the even lanes directly, those of the odd lanes after a 32-bit
// shift (the compiler's own vectorization of the portable loop emulates them poorly).
__attribute__((target("avx2"), always_inline)) inline void philox_round_avx2(
    __m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
  const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
  const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
  const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
  const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
  c1 = lo1;
  c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
  c3 = lo0;
}

// sign_masks_generic on AVX2: 8 rows x 2 Philox blocks per step (the same bits). Rows are
// 64-bit, so the low word's carry is added (an unsigned compare, by flipping the sign bits).
__attribute__((target("avx2"))) void sign_masks_avx2(uint64_t seed, uint64_t row0, int64_t nrows,
                                                     uint64_t col_block, SignMasks& masks) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i tag = _mm256_set1_epi32(static_cast<int>(kRademacherTag));
  const __m256i block0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(col_block)));
  const __m256i block1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(col_block + 1)));
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // Bytes 0-1 (low) or 2-3 (high) of each 32-bit lane, packed into each 128-bit half's low 8.
  const __m256i low16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                         0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i high16 = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                          2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t r = 0; r < nrows; r += 8) {
    const uint64_t row = row0 + static_cast<uint64_t>(r);
    const __m256i lo_base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m256i hi_base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
    const __m256i lo = _mm256_add_epi32(lo_base, iota);
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo_base, flip),
                                             _mm256_xor_si256(lo, flip));   // -1 where lo wrapped
    const __m256i hi = _mm256_sub_epi32(hi_base, carry);
    __m256i w[8] = {lo, hi, block0, tag, lo, hi, block1, tag};
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i k0v = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i k1v = _mm256_set1_epi32(static_cast<int>(k1));
      philox_round_avx2(w[0], w[1], w[2], w[3], k0v, k1v);
      philox_round_avx2(w[4], w[5], w[6], w[7], k0v, k1v);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int t = 0; t < 8; ++t) {
      const __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w[t], low16), 0x08);
      const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w[t], high16), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&masks[2 * t][r]), _mm256_castsi256_si128(a));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&masks[2 * t + 1][r]), _mm256_castsi256_si128(b));
    }
  }
}
#endif

#ifdef TRAK_FAST_X86_DISPATCH
// 16 rows x 2 Philox blocks per step; rows are 64-bit, so the low word's carry is added.
__attribute__((target("avx512f"))) void sign_masks_avx512(uint64_t seed, uint64_t row0,
                                                          int64_t nrows, uint64_t col_block,
                                                          SignMasks& masks) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i tag = _mm512_set1_epi32(static_cast<int>(kRademacherTag));
  const __m512i block0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(col_block)));
  const __m512i block1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(col_block + 1)));
  for (int64_t r = 0; r < nrows; r += 16) {
    const uint64_t row = row0 + static_cast<uint64_t>(r);
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m512i hi_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
    const __m512i lo = _mm512_add_epi32(lo_base, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, lo_base);
    const __m512i hi = _mm512_mask_add_epi32(hi_base, carry, hi_base, _mm512_set1_epi32(1));
    __m512i w[8] = {lo, hi, block0, tag, lo, hi, block1, tag};
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i k0v = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i k1v = _mm512_set1_epi32(static_cast<int>(k1));
      philox_round_avx512(w[0], w[1], w[2], w[3], k0v, k1v);
      philox_round_avx512(w[4], w[5], w[6], w[7], k0v, k1v);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int t = 0; t < 8; ++t) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(&masks[2 * t][r]), _mm512_cvtepi32_epi16(w[t]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(&masks[2 * t + 1][r]),
                         _mm512_cvtepi32_epi16(_mm512_srli_epi32(w[t], 16)));
    }
  }
}

// part[nb][0 .. 16 NV) = partial sums of batch rows g[0 .. NB) over the block, for the
// 16 NV columns of groups v0 .. v0 + NV. The NB x NV accumulators stay in registers.
template <int NB, int NV>
__attribute__((target("avx512f"))) void block_avx512(const float* const* g, int64_t nrows,
                                                     const SignMasks& masks, int v0,
                                                     float* part, int64_t part_ld) {
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  __m512 acc[NB][NV];
  for (int nb = 0; nb < NB; ++nb)
    for (int v = 0; v < NV; ++v) acc[nb][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < nrows; ++r) {
    __m512 gv[NB];
    for (int nb = 0; nb < NB; ++nb) gv[nb] = _mm512_set1_ps(g[nb][r]);
    for (int v = 0; v < NV; ++v) {
      const __m512 sign = _mm512_mask_blend_ps(masks[v0 + v][r], one, minus_one);
      for (int nb = 0; nb < NB; ++nb) acc[nb][v] = _mm512_fmadd_ps(sign, gv[nb], acc[nb][v]);
    }
  }
  for (int nb = 0; nb < NB; ++nb)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(part + nb * part_ld + 16 * v, acc[nb][v]);
}

// Batch rows per register block and 16-column groups per pass: NB x NV accumulators.
constexpr int kAvxRows = 8;

template <int NB>
__attribute__((target("avx512f"))) void rows_avx512(const float* const* g, int64_t nrows,
                                                    const SignMasks& masks, int ngroups,
                                                    float* part) {
  constexpr int NV = NB == 1 ? 16 : NB <= 3 ? 8 : NB <= 6 ? 4 : 2;
  for (int v0 = 0; v0 < ngroups; v0 += NV)
    block_avx512<NB, NV>(g, nrows, masks, v0, part + 16 * v0, kChunk);
}

__attribute__((target("avx512f"))) void block_rows_avx512(const float* const* g, int64_t nb,
                                                          int64_t nrows, const SignMasks& masks,
                                                          int ngroups, float* part) {
  switch (nb) {
    case 1: return rows_avx512<1>(g, nrows, masks, ngroups, part);
    case 2: return rows_avx512<2>(g, nrows, masks, ngroups, part);
    case 3: return rows_avx512<3>(g, nrows, masks, ngroups, part);
    case 4: return rows_avx512<4>(g, nrows, masks, ngroups, part);
    case 5: return rows_avx512<5>(g, nrows, masks, ngroups, part);
    case 6: return rows_avx512<6>(g, nrows, masks, ngroups, part);
    case 7: return rows_avx512<7>(g, nrows, masks, ngroups, part);
    default: return rows_avx512<8>(g, nrows, masks, ngroups, part);
  }
}
static_assert(kAvxRows == 8, "block_rows_avx512 handles up to 8 rows");
#endif

// Copies g[b, row0 .. row0 + nrows) of a piece as float32 into buf[b * kBlockRows ..], or
// points straight at it when it already is contiguous float32.
void gather_rows(const at::Tensor& piece, int64_t row0, int64_t nrows, float* buf,
                 const float** rows) {
  const int64_t batch = piece.size(0), s0 = piece.stride(0), s1 = piece.stride(1);
  if (piece.scalar_type() == at::kFloat && s1 == 1) {
    const float* base = piece.const_data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) rows[b] = base + b * s0 + row0;
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, piece.scalar_type(),
                                  "trak_fast_gather_rows", [&] {
    const scalar_t* base = piece.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      float* dst = buf + b * kBlockRows;
      const scalar_t* src = base + b * s0 + row0 * s1;
      for (int64_t r = 0; r < nrows; ++r) dst[r] = static_cast<float>(src[r * s1]);
      rows[b] = dst;
    }
  });
}

}  // namespace

void project_columns_registers(const at::Tensor& out, const std::vector<at::Tensor>& pieces,
                               uint64_t seed, int64_t feature_offset, double scale, int64_t col0,
                               int64_t ncols) {
  const int64_t batch = out.size(0), k = out.size(1);
  const int ngroups = static_cast<int>((ncols + 15) / 16);
  const uint64_t col_block = static_cast<uint64_t>(col0 / kRademacherBlockCols);
  const bool avx512 = use_avx512();
#ifdef TRAK_FAST_X86_DISPATCH
  const bool avx2 = !avx512 && use_avx2();
#else
  const bool avx2 = false;
#endif
  (void)avx2;
  alignas(64) SignMasks masks;
  std::vector<double> total(batch * kChunk, 0.0);
  std::vector<float> buf(batch * kBlockRows);
  std::vector<const float*> rows(batch);
  alignas(64) float part[kAvxRows * kChunk];
  int64_t offset = feature_offset;
  for (const at::Tensor& piece : pieces) {
    const int64_t width = piece.size(1);
    for (int64_t row0 = 0; row0 < width; row0 += kBlockRows) {
      const int64_t nrows = std::min(kBlockRows, width - row0);
      const uint64_t row = static_cast<uint64_t>(offset + row0);
      gather_rows(piece, row0, nrows, buf.data(), rows.data());
#ifdef TRAK_FAST_X86_DISPATCH
      if (avx512) {
        sign_masks_avx512(seed, row, nrows, col_block, masks);
        for (int64_t b0 = 0; b0 < batch; b0 += kAvxRows) {
          const int64_t nb = std::min<int64_t>(kAvxRows, batch - b0);
          block_rows_avx512(rows.data() + b0, nb, nrows, masks, ngroups, part);
          for (int64_t b = 0; b < nb; ++b)
            for (int j = 0; j < 16 * ngroups; ++j)
              total[(b0 + b) * kChunk + j] += part[b * kChunk + j];
        }
        continue;
      }
#endif
      (void)avx512;
#ifdef TRAK_FAST_X86_DISPATCH
      if (avx2) {
        sign_masks_avx2(seed, row, nrows, col_block, masks);
        for (int64_t b0 = 0; b0 < batch; b0 += kAvx2Rows) {
          const int64_t nb = std::min<int64_t>(kAvx2Rows, batch - b0);
          block_rows_avx2(rows.data() + b0, nb, nrows, masks, ngroups, total.data() + b0 * kChunk);
        }
        continue;
      }
#endif
      sign_masks_generic(seed, row, nrows, col_block, masks);
      for (int64_t b0 = 0; b0 < batch;) {
        const int64_t nb = batch - b0 >= 4 ? 4 : 1;
        if (nb == 4) {
          block_generic_4(rows.data() + b0, nrows, masks, ngroups, part);
        } else {
          block_generic_1(rows.data() + b0, nrows, masks, ngroups, part);
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int j = 0; j < 16 * ngroups; ++j) total[(b0 + b) * kChunk + j] += part[b * kChunk + j];
        b0 += nb;
      }
    }
    offset += width;
  }
  float* dst = out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < ncols; ++j)
      dst[b * k + col0 + j] = dst[b * k + col0 + j] + static_cast<float>(scale * total[b * kChunk + j]);
}

}  // namespace trak_fast
