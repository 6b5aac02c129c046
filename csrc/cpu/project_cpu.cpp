// CPU kernels: generate tiles of R into a small buffer, multiply them with BLAS; and the
// choice between this path and the register kernel (project_registers_cpu.cpp).
//
// out[:, cols] += scale * G[:, rows] @ R[rows, cols], one tile of R at a time. The tile
// buffers (one per thread, kTileElems entries) are the only extra memory, whatever n is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../project.h"
#include "cpu_kernels.h"
#include "trak_fast/random_matrix.h"

namespace trak_fast {

bool use_avx512() {
#ifdef TRAK_FAST_X86_DISPATCH
  static const bool enabled = [] {
    const char* off = std::getenv("TRAK_FAST_DISABLE_AVX512");
    return __builtin_cpu_supports("avx512f") && !(off && off[0] == '1');
  }();
  return enabled;
#else
  return false;
#endif
}

namespace {

// A thread's tile of R holds at most kTileElems entries (512 KiB in float32: it stays in
// the core's L2 between generation and the GEMM).
constexpr int64_t kTileElems = int64_t(1) << 17;

// MKL's result for a GEMM can depend on how many threads it uses. Inside a chunk we want
// one thread, always. MKL_Set_Num_Threads_Local (the C entry point; the lower-case name is
// the Fortran one, taking a pointer) is thread-local; weak, so absent without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
struct SerialBlas {
  int previous = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// kSignTable[byte] holds the 8 entries (+1 / -1) that the bits of `byte` encode.
template <typename scalar_t>
struct SignTable {
  std::array<std::array<scalar_t, 8>, 256> rows;
  SignTable() {
    for (int byte = 0; byte < 256; ++byte)
      for (int bit = 0; bit < 8; ++bit) rows[byte][bit] = ((byte >> bit) & 1) ? -1 : 1;
  }
};

// Gaussian entries R[row, col0 .. col0 + ncols), col0 a multiple of 4.
//
// Philox and Box-Muller run over many counters at a time. The generic version is plain
// lane loops that the compiler vectorizes (the header's arithmetic is branch-free for
// this; target_clones builds AVX2 and baseline versions). On AVX-512 CPUs Philox runs on
// two interleaved 16-lane vectors written with intrinsics (compilers emulate the
// 32x32->64 multiply poorly), which is ~3x faster. Every version performs the same IEEE
// operations (-ffp-contract=off), so all produce the same bits; the tests compare both
// with an independent reference (TRAK_FAST_DISABLE_AVX512=1 selects the generic one).
constexpr int kGaussianLanes = 16;

// Writes lanes [0, L) of the 4 x L Philox outputs of a row as Gaussian entries.
template <int L>
inline void box_muller_lanes(const uint32_t (&w)[4][L], int64_t len, float* dst) {
  float z[4][L];
  for (int l = 0; l < L; ++l) box_muller(w[0][l], w[1][l], z[0][l], z[1][l]);
  for (int l = 0; l < L; ++l) box_muller(w[2][l], w[3][l], z[2][l], z[3][l]);
  if (len == 4 * L) {
    for (int l = 0; l < L; ++l)
      for (int t = 0; t < 4; ++t) dst[4 * l + t] = z[t][l];
  } else {
    for (int64_t e = 0; e < len; ++e) dst[e] = z[e % 4][e / 4];
  }
}

#ifdef TRAK_FAST_X86_DISPATCH
__attribute__((target_clones("avx2", "default")))
#endif
void gaussian_row_generic(uint64_t seed, uint64_t row, int64_t col0, int64_t ncols, float* dst) {
  constexpr int L = kGaussianLanes;
  const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(row >> 32);
  const uint32_t key_lo = static_cast<uint32_t>(seed), key_hi = static_cast<uint32_t>(seed >> 32);
  for (int64_t c = 0; c < ncols; c += 4 * L) {
    const uint32_t block0 = static_cast<uint32_t>((col0 + c) / kGaussianBlockCols);
    uint32_t w[4][L];
    for (int l = 0; l < L; ++l) {
      const Philox4 r = philox4x32_10(row_lo, row_hi, block0 + l, kGaussianTag, key_lo, key_hi);
      for (int t = 0; t < 4; ++t) w[t][l] = r.w[t];
    }
    box_muller_lanes<L>(w, std::min<int64_t>(4 * L, ncols - c), dst + c);
  }
}

#ifdef TRAK_FAST_X86_DISPATCH
__attribute__((target("avx512f")))
void gaussian_row_avx512(uint64_t seed, uint64_t row, int64_t col0, int64_t ncols, float* dst) {
  constexpr int L = 32;  // two interleaved vectors of 16 counters hide the multiply latency
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
  const __m512i row_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
  const __m512i tag = _mm512_set1_epi32(static_cast<int>(kGaussianTag));
  for (int64_t c = 0; c < ncols; c += 4 * L) {
    const uint32_t block0 = static_cast<uint32_t>((col0 + c) / kGaussianBlockCols);
    __m512i a0 = row_lo, a1 = row_hi, a3 = tag, b0 = row_lo, b1 = row_hi, b3 = tag;
    __m512i a2 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(block0)), iota);
    __m512i b2 = _mm512_add_epi32(a2, _mm512_set1_epi32(16));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i k0v = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i k1v = _mm512_set1_epi32(static_cast<int>(k1));
      philox_round_avx512(a0, a1, a2, a3, k0v, k1v);
      philox_round_avx512(b0, b1, b2, b3, k0v, k1v);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    alignas(64) uint32_t w[4][L];
    _mm512_store_si512(w[0], a0);
    _mm512_store_si512(w[1], a1);
    _mm512_store_si512(w[2], a2);
    _mm512_store_si512(w[3], a3);
    _mm512_store_si512(w[0] + 16, b0);
    _mm512_store_si512(w[1] + 16, b1);
    _mm512_store_si512(w[2] + 16, b2);
    _mm512_store_si512(w[3] + 16, b3);
    box_muller_lanes<L>(w, std::min<int64_t>(4 * L, ncols - c), dst + c);
  }
}
#endif

void gaussian_row(uint64_t seed, uint64_t row, int64_t col0, int64_t ncols, float* dst) {
#ifdef TRAK_FAST_X86_DISPATCH
  if (use_avx512()) return gaussian_row_avx512(seed, row, col0, ncols, dst);
#endif
  gaussian_row_generic(seed, row, col0, ncols, dst);
}

// R[row, col0 .. col0 + ncols) into dst; col0 is a multiple of the kind's block width.
template <typename scalar_t>
void generate_row(int64_t kind, uint64_t seed, uint64_t row, int64_t col0, int64_t ncols,
                  scalar_t* dst) {
  if (kind == kRademacher) {
    static const SignTable<scalar_t> table;
    for (int64_t c = 0; c < ncols; c += kRademacherBlockCols) {
      const Philox4 bits = rademacher_bits(seed, row, (col0 + c) / kRademacherBlockCols);
      const int64_t len = std::min<int64_t>(kRademacherBlockCols, ncols - c);
      if (len == kRademacherBlockCols) {
        for (int b = 0; b < 16; ++b) {
          const uint32_t byte = (bits.w[b / 4] >> (8 * (b % 4))) & 0xFFu;
          std::memcpy(dst + c + 8 * b, table.rows[byte].data(), 8 * sizeof(scalar_t));
        }
      } else {
        for (int64_t t = 0; t < len; ++t)
          dst[c + t] = ((bits.w[t / 32] >> (t % 32)) & 1u) ? scalar_t(-1) : scalar_t(1);
      }
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    gaussian_row(seed, row, col0, ncols, dst);
  } else {
    float tmp[kGaussianLanes * kGaussianBlockCols];
    for (int64_t c = 0; c < ncols; c += kGaussianLanes * kGaussianBlockCols) {
      const int64_t len = std::min<int64_t>(kGaussianLanes * kGaussianBlockCols, ncols - c);
      gaussian_row(seed, row, col0 + c, len, tmp);
      for (int64_t t = 0; t < len; ++t) dst[c + t] = static_cast<scalar_t>(tmp[t]);
    }
  }
}

// Rows [row0, row0 + nrows) of R, columns [col0, col0 + ncols), into a row-major buffer
// with leading dimension ld, in parallel over rows.
template <typename scalar_t>
void generate_tile(int64_t kind, uint64_t seed, uint64_t row0, int64_t nrows, int64_t col0,
                   int64_t ncols, scalar_t* buf, int64_t ld) {
  at::parallel_for(0, nrows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      generate_row<scalar_t>(kind, seed, row0 + r, col0, ncols, buf + r * ld);
  });
}

}  // namespace

namespace {

// out[:, col0:col1] += scale * sum over pieces of G_piece @ R[rows of piece, col0:col1],
// one tile of R at a time: generate it into a small buffer, multiply with BLAS.
void project_columns(const at::Tensor& acc, const std::vector<at::Tensor>& grads, uint64_t seed,
                     int64_t kind, int64_t feature_offset, double scale, int64_t col0,
                     int64_t col1) {
  const int64_t ncols = col1 - col0;
  const at::ScalarType dtype = acc.scalar_type();
  const int64_t tile_rows = kTileElems / kChunkCols;
  at::Tensor tile = at::empty({tile_rows, ncols}, acc.options());
  at::Tensor acc_cols = acc.narrow(1, col0, ncols);
  int64_t offset = feature_offset;
  for (const at::Tensor& g : grads) {
    const int64_t width = g.size(1);
    for (int64_t row0 = 0; row0 < width; row0 += tile_rows) {
      const int64_t nrows = std::min(tile_rows, width - row0);
      AT_DISPATCH_FLOATING_TYPES(dtype, "trak_fast_generate_tile", [&] {
        generate_tile<scalar_t>(kind, seed, static_cast<uint64_t>(offset + row0), nrows, col0,
                                ncols, tile.data_ptr<scalar_t>(), ncols);
      });
      // Converts fp16 / bf16 one slice at a time, so no full-size copy is made.
      const at::Tensor g_slice = g.narrow(1, row0, nrows).to(dtype);
      acc_cols.addmm_(g_slice, tile.narrow(0, 0, nrows), 1, scale);
    }
    offset += width;
  }
}

}  // namespace

void project_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                     int64_t feature_offset, double scale, int64_t precision) {
  check_project_args(out, grads, seed, kind, feature_offset, precision);
  const int64_t k = out.size(1);
  if (out.size(0) == 0 || k == 0) return;
  // BLAS accumulates into a contiguous target; copy back only if out is strided.
  at::Tensor acc = out.is_contiguous() ? out : out.contiguous();
  // The output columns are cut into chunks of kChunkCols, a function of k alone, and the
  // threads share out the chunks. Each chunk generates its own tiles and runs
  // single-threaded GEMMs into its own columns: tiles stay in the core's cache, no
  // reduction is needed, and every output element is summed in the same order whatever
  // the thread count, so results are bitwise reproducible across machines' thread counts.
  // [B, width] views of the pieces, made once (a non-viewable piece is copied once, here).
  std::vector<at::Tensor> pieces;
  pieces.reserve(grads.size());
  for (const at::Tensor& piece : grads) pieces.push_back(piece.reshape({out.size(0), -1}));
  // float32 Rademacher projections take the register kernel (project_registers_cpu.cpp) at
  // every batch size, which never expands R into a tile; it sums in its own fixed order, so
  // it agrees with the tile path to rounding, and is itself bitwise independent of the
  // thread count, the instruction set and the batch size.
  const bool registers = kind == kRademacher && acc.scalar_type() == at::kFloat &&
                         rademacher_registers_chosen();
  const int64_t chunks = (k + kChunkCols - 1) / kChunkCols;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const SerialBlas serial;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t col0 = chunk * kChunkCols, col1 = std::min(k, col0 + kChunkCols);
      if (registers) {
        project_columns_registers(acc, pieces, static_cast<uint64_t>(seed), feature_offset,
                                  scale, col0, col1 - col0);
      } else {
        project_columns(acc, pieces, static_cast<uint64_t>(seed), kind, feature_offset, scale,
                        col0, col1);
      }
    }
  });
  if (!acc.is_same(out)) out.copy_(acc);
}

void fill_projection_matrix_cpu(const at::Tensor& out, int64_t seed, int64_t kind,
                                int64_t feature_offset, double scale) {
  check_matrix_args(out, seed, kind, feature_offset);
  const int64_t n = out.size(0), k = out.size(1);
  if (n == 0 || k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trak_fast_fill_projection_matrix", [&] {
    generate_tile<scalar_t>(kind, static_cast<uint64_t>(seed),
                            static_cast<uint64_t>(feature_offset), n, 0, k,
                            out.data_ptr<scalar_t>(), k);
  });
  // Entries are defined in float32 and scaled in the output's precision; for
  // Rademacher the product is exact.
  if (out.scalar_type() == at::kFloat) {
    out.mul_(static_cast<float>(scale));
  } else {
    out.mul_(scale);
  }
}

}  // namespace trak_fast
