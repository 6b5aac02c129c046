// Pieces shared by the CPU kernels (csrc/cpu/*.cpp): the instruction-set dispatch, the
// AVX-512 Philox round, and the register kernel for float32 Rademacher projections.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define TRAK_FAST_X86_DISPATCH 1
#endif

namespace trak_fast {

// True where the CPU has AVX-512F and TRAK_FAST_DISABLE_AVX512=1 is not set (read once).
// Every AVX-512 path has a portable twin that produces the same bits.
bool use_avx512();

#ifdef TRAK_FAST_X86_DISPATCH
// One Philox4x32-10 round on 16 counters: the 32x32->64 products of the even lanes come
// from _mm512_mul_epu32 directly, those of the odd lanes after a 32-bit shift.
__attribute__((target("avx512f"), always_inline)) inline void philox_round_avx512(
    __m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, __m512i k0, __m512i k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __mmask16 odd = 0xAAAA;
  const __m512i p0e = _mm512_mul_epu32(c0, m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
  const __m512i p1e = _mm512_mul_epu32(c2, m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
  const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0e, _mm512_slli_epi64(p0o, 32));
  const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0e, 32), p0o);
  const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1e, _mm512_slli_epi64(p1o, 32));
  const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1e, 32), p1o);
  c0 = _mm512_ternarylogic_epi32(hi1, c1, k0, 0x96);  // hi1 ^ c1 ^ k0
  c1 = lo1;
  c2 = _mm512_ternarylogic_epi32(hi0, c3, k1, 0x96);  // hi0 ^ c3 ^ k1
  c3 = lo0;
}
#endif

// Output columns per chunk of work, whichever kernel runs: a multiple of
// kRademacherBlockCols. Threads share out whole chunks.
constexpr int64_t kChunkCols = 256;

// Whether project_add_cpu runs the register kernel for a float32 Rademacher projection: yes,
// whatever the shape and the CPU, so a call sums in the same order (and gives the same bits)
// everywhere, and each batch row's result does not depend on the rest of the batch. With
// AVX-512 (AMD EPYC, benchmarks/kernel_choice.py) it was 2.2-14x faster than tiles + GEMM at
// every measured shape; its AVX2 + FMA version runs near the two FMAs per cycle of the ports.
// TRAK_FAST_CPU_KERNEL=tiles (or =registers / =auto, the default) overrides it, read at every
// call, for benchmarks and tests only. The Gaussian kind and float64 outputs take the tiles.
bool rademacher_registers_chosen();

// out[:, col0:col0 + ncols] += scale * sum over pieces of piece @ R[rows, col0:col0 + ncols]
// for Rademacher R, ncols <= kChunkCols and col0 a multiple of it, out a contiguous float32
// [B, k] tensor and each piece a [B, width] view of any floating dtype. Single-threaded;
// the caller shares out the column chunks. See project_registers_cpu.cpp.
void project_columns_registers(const at::Tensor& out, const std::vector<at::Tensor>& pieces,
                               uint64_t seed, int64_t feature_offset, double scale, int64_t col0,
                               int64_t ncols);

}  // namespace trak_fast
