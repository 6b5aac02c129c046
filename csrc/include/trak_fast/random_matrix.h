// The definition of trak_fast's random projection matrix.
//
// This header is a file format: every feature ever computed with trak_fast is a
// function of what is written here. Both the C++ and the CUDA compilers include it,
// so the CPU and the GPU generate the same matrix from the same seed. Change nothing
// here without changing the golden values in tests/test_matrix_definition.py, and
// never do that: features computed today must be reproducible next year.
//
// The unscaled matrix R has entries R[i, j] that are a pure function of
// (seed, i, j, kind):
//
//   rademacher: bit b of Philox4x32-10(counter, key) chooses the sign,
//               R[i, j] = b ? -1 : +1, where
//                 counter = (lo32(i), hi32(i), j / 128, 0x52414430 "RAD0")
//                 key     = (lo32(seed), hi32(seed))
//                 b       = bit (j % 32) of output word (j / 32) % 4
//   gaussian:   Box-Muller on the four output words of
//                 counter = (lo32(i), hi32(i), j / 4, 0x47415530 "GAU0"),
//               pairs (w0, w1) -> columns 4m, 4m+1 and (w2, w3) -> 4m+2, 4m+3,
//               computed in float32 with only correctly rounded IEEE operations
//               (+, *, /, sqrt, integer-to-float conversion), so that every
//               compiler that obeys IEEE 754 gets the same bits (see box_muller).
//
// The projection matrix is P = R / sqrt(proj_dim) (or R itself in the trak
// compatibility layer, whose convention is unscaled entries).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

#if !defined(__CUDACC__)
#include <cmath>
#include <cstring>
#endif

namespace trak_fast {

enum MatrixKind : int64_t { kRademacher = 0, kGaussian = 1 };

constexpr uint32_t kRademacherTag = 0x52414430u;  // "RAD0"
constexpr uint32_t kGaussianTag = 0x47415530u;    // "GAU0"
// Columns covered by one Philox call.
constexpr int64_t kRademacherBlockCols = 128;
constexpr int64_t kGaussianBlockCols = 4;

struct Philox4 {
  uint32_t w[4];
};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011), with the multipliers and Weyl constants of that paper.
TF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// 128 Rademacher signs of row `row`, columns [128 * col_block, 128 * col_block + 128).
// Bit t of the result's word (t / 32) is set where the entry is -1.
TF_HD Philox4 rademacher_bits(uint64_t seed, uint64_t row, uint64_t col_block) {
  return philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                       static_cast<uint32_t>(col_block), kRademacherTag,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

TF_HD float rademacher_entry(uint64_t seed, uint64_t row, uint64_t col) {
  const Philox4 r = rademacher_bits(seed, row, col / kRademacherBlockCols);
  const uint32_t word = r.w[(col / 32) % 4];
  return ((word >> (col % 32)) & 1u) ? -1.0f : 1.0f;
}

// ---- float32 arithmetic that no compiler may fuse or reassociate -------------------
// nvcc contracts a * b + c into an FMA by default, which changes the rounding; the
// _rn intrinsics are never contracted. Host code is compiled with -ffp-contract=off.
#if defined(__CUDA_ARCH__)
TF_HD float tf_mul(float a, float b) { return __fmul_rn(a, b); }
TF_HD float tf_add(float a, float b) { return __fadd_rn(a, b); }
TF_HD float tf_sub(float a, float b) { return __fsub_rn(a, b); }
TF_HD float tf_div(float a, float b) { return __fdiv_rn(a, b); }
TF_HD float tf_sqrt(float a) { return __fsqrt_rn(a); }
TF_HD uint32_t tf_float_bits(float a) { return __float_as_uint(a); }
TF_HD float tf_bits_float(uint32_t a) { return __uint_as_float(a); }
#else
TF_HD float tf_mul(float a, float b) { return a * b; }
TF_HD float tf_add(float a, float b) { return a + b; }
TF_HD float tf_sub(float a, float b) { return a - b; }
TF_HD float tf_div(float a, float b) { return a / b; }
TF_HD float tf_sqrt(float a) { return std::sqrt(a); }
TF_HD uint32_t tf_float_bits(float a) {
  uint32_t u;
  std::memcpy(&u, &a, sizeof u);
  return u;
}
TF_HD float tf_bits_float(uint32_t a) {
  float f;
  std::memcpy(&f, &a, sizeof f);
  return f;
}
#endif

// Natural log of u in (0, 1], as part of the matrix definition (not a libm
// replacement): u = m * 2^e with m in [sqrt(1/2), sqrt(2)), s = (m - 1) / (m + 1),
// log(m) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9). Accurate to a few ulp.
TF_HD float definition_log(float u) {
  const uint32_t bits = tf_float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
  float m = tf_bits_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  // Branch-free, so that the CPU can vectorize a loop of these.
  const bool high = m > 1.41421356f;
  m = high ? tf_mul(m, 0.5f) : m;
  e += high ? 1 : 0;
  const float s = tf_div(tf_sub(m, 1.0f), tf_add(m, 1.0f));
  const float s2 = tf_mul(s, s);
  float poly = 0.11111111f;                        // 1/9
  poly = tf_add(tf_mul(poly, s2), 0.14285715f);    // 1/7
  poly = tf_add(tf_mul(poly, s2), 0.2f);           // 1/5
  poly = tf_add(tf_mul(poly, s2), 0.33333334f);    // 1/3
  poly = tf_add(tf_mul(poly, s2), 1.0f);
  const float log_m = tf_mul(tf_mul(2.0f, s), poly);
  return tf_add(tf_mul(static_cast<float>(e), 0.69314718f), log_m);
}

// Box-Muller on two 32-bit words, both reduced to their top bits so that every
// integer-to-float conversion is exact:
//   u1    = (a / 2^8 + 1) / 2^24                    in (0, 1]
//   r     = sqrt(-2 log u1)
//   q     = b / 2^30                                 (the quarter turn, 0..3)
//   phi   = ((b / 2^8) mod 2^22 / 2^22 - 1/2) * pi/2  in [-pi/4, pi/4)
//   angle = q * pi/2 + phi, uniform on a full turn
//   (z0, z1) = r * (cos angle, sin angle)
// with sin and cos of phi as Taylor polynomials (degree 9 and 10; error < 2e-9).
TF_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float u1 = tf_mul(static_cast<float>((a >> 8) + 1u), 5.9604645e-08f);  // 2^-24
  const float r = tf_sqrt(tf_mul(-2.0f, definition_log(u1)));
  const uint32_t quarter = b >> 30;
  const float frac = tf_mul(static_cast<float>((b >> 8) & 0x3FFFFFu), 2.3841858e-07f);  // 2^-22
  const float phi = tf_mul(tf_sub(frac, 0.5f), 1.5707964f);
  const float p2 = tf_mul(phi, phi);
  float sin_poly = 2.7557319e-06f;                       // 1/9!
  sin_poly = tf_sub(tf_mul(sin_poly, p2), 1.9841270e-04f);  // 1/7!
  sin_poly = tf_add(tf_mul(sin_poly, p2), 8.3333333e-03f);  // 1/5!
  sin_poly = tf_sub(tf_mul(sin_poly, p2), 1.6666667e-01f);  // 1/3!
  sin_poly = tf_add(tf_mul(sin_poly, p2), 1.0f);
  const float s = tf_mul(phi, sin_poly);
  float c = -2.7557319e-07f;                 // -1/10!
  c = tf_add(tf_mul(c, p2), 2.4801587e-05f);  // 1/8!
  c = tf_sub(tf_mul(c, p2), 1.3888889e-03f);  // 1/6!
  c = tf_add(tf_mul(c, p2), 4.1666668e-02f);  // 1/4!
  c = tf_sub(tf_mul(c, p2), 0.5f);            // 1/2!
  c = tf_add(tf_mul(c, p2), 1.0f);
  // Rotate (c, s) by `quarter` quarter turns: (c, s), (-s, c), (-c, -s), (s, -c).
  // Negation is exact; written with selects so the CPU can vectorize it.
  const bool odd = (quarter & 1u) != 0;
  const float x = odd ? s : c;
  const float y = odd ? c : s;
  const float cos_a = (quarter == 1u || quarter == 2u) ? -x : x;
  const float sin_a = (quarter >= 2u) ? -y : y;
  z0 = tf_mul(r, cos_a);
  z1 = tf_mul(r, sin_a);
}

// The four Gaussian entries of row `row`, columns [4 * col_block, 4 * col_block + 4).
TF_HD void gaussian_block(uint64_t seed, uint64_t row, uint64_t col_block, float out[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                  static_cast<uint32_t>(col_block), kGaussianTag,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.w[0], r.w[1], out[0], out[1]);
  box_muller(r.w[2], r.w[3], out[2], out[3]);
}

TF_HD float gaussian_entry(uint64_t seed, uint64_t row, uint64_t col) {
  float block[4];
  gaussian_block(seed, row, col / kGaussianBlockCols, block);
  return block[col % kGaussianBlockCols];
}

TF_HD float matrix_entry(int64_t kind, uint64_t seed, uint64_t row, uint64_t col) {
  return kind == kGaussian ? gaussian_entry(seed, row, col) : rademacher_entry(seed, row, col);
}

}  // namespace trak_fast
