// CPU kernels: generate tiles of R into a small buffer, multiply them with BLAS.
//
// out[:, cols] += scale * G[:, rows] @ R[rows, cols], one tile of R at a time. The tile
// buffers (one per thread, kTileElems entries) are the only extra memory, whatever n is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>

#include "../project.h"
#include "trak_fast/random_matrix.h"

namespace trak_fast {
namespace {

// A thread's tile of R holds at most kTileElems entries (512 KiB in float32: it stays in
// the core's L2 between generation and the GEMM) and at most kTileCols columns.
constexpr int64_t kTileElems = int64_t(1) << 17;
constexpr int64_t kTileCols = 2048;  // a multiple of kRademacherBlockCols

// kSignTable[byte] holds the 8 entries (+1 / -1) that the bits of `byte` encode.
template <typename scalar_t>
struct SignTable {
  std::array<std::array<scalar_t, 8>, 256> rows;
  SignTable() {
    for (int byte = 0; byte < 256; ++byte)
      for (int bit = 0; bit < 8; ++bit) rows[byte][bit] = ((byte >> bit) & 1) ? -1 : 1;
  }
};

// Gaussian entries R[row, col0 .. col0 + ncols), col0 a multiple of 4. Philox and
// Box-Muller run over kGaussianLanes counters at a time in plain loops that the compiler
// vectorizes (the header's arithmetic is branch-free for this); target_clones builds
// AVX-512, AVX2 and baseline versions and picks one at load time. Every version does
// the same IEEE operations (no contraction, -ffp-contract=off), so the bits are the same.
constexpr int kGaussianLanes = 16;

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void gaussian_row(uint64_t seed, uint64_t row, int64_t col0, int64_t ncols, float* dst) {
  constexpr int L = kGaussianLanes;
  const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(row >> 32);
  const uint32_t key_lo = static_cast<uint32_t>(seed), key_hi = static_cast<uint32_t>(seed >> 32);
  for (int64_t c = 0; c < ncols; c += L * kGaussianBlockCols) {
    const uint32_t block0 = static_cast<uint32_t>((col0 + c) / kGaussianBlockCols);
    uint32_t w[4][L];
    for (int l = 0; l < L; ++l) {
      const Philox4 r = philox4x32_10(row_lo, row_hi, block0 + l, kGaussianTag, key_lo, key_hi);
      w[0][l] = r.w[0];
      w[1][l] = r.w[1];
      w[2][l] = r.w[2];
      w[3][l] = r.w[3];
    }
    float z[4][L];
    for (int l = 0; l < L; ++l) box_muller(w[0][l], w[1][l], z[0][l], z[1][l]);
    for (int l = 0; l < L; ++l) box_muller(w[2][l], w[3][l], z[2][l], z[3][l]);
    const int64_t len = std::min<int64_t>(L * kGaussianBlockCols, ncols - c);
    if (len == L * kGaussianBlockCols) {
      for (int l = 0; l < L; ++l)
        for (int t = 0; t < 4; ++t) dst[c + 4 * l + t] = z[t][l];
    } else {
      for (int64_t e = 0; e < len; ++e) dst[c + e] = z[e % 4][e / 4];
    }
  }
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
void project_columns(const at::Tensor& acc, at::TensorList grads, uint64_t seed, int64_t kind,
                     int64_t feature_offset, double scale, int64_t col0, int64_t col1) {
  const int64_t batch = acc.size(0);
  const at::ScalarType dtype = acc.scalar_type();
  const int64_t tile_cols = std::min(col1 - col0, kTileCols);
  const int64_t tile_rows = std::max<int64_t>(64, kTileElems / tile_cols);
  at::Tensor tile = at::empty({tile_rows, tile_cols}, acc.options());
  int64_t offset = feature_offset;
  for (const at::Tensor& piece : grads) {
    const at::Tensor g = piece.reshape({batch, -1});
    const int64_t width = g.size(1);
    for (int64_t c = col0; c < col1; c += tile_cols) {
      const int64_t ncols = std::min(tile_cols, col1 - c);
      at::Tensor acc_cols = acc.narrow(1, c, ncols);
      for (int64_t row0 = 0; row0 < width; row0 += tile_rows) {
        const int64_t nrows = std::min(tile_rows, width - row0);
        AT_DISPATCH_FLOATING_TYPES(dtype, "trak_fast_generate_tile", [&] {
          generate_tile<scalar_t>(kind, seed, static_cast<uint64_t>(offset + row0), nrows, c,
                                  ncols, tile.data_ptr<scalar_t>(), tile_cols);
        });
        // Converts fp16 / bf16 one slice at a time, so no full-size copy is made.
        const at::Tensor g_slice = g.narrow(1, row0, nrows).to(dtype);
        acc_cols.addmm_(g_slice, tile.narrow(0, 0, nrows).narrow(1, 0, ncols), 1, scale);
      }
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
  // Split the output columns, in whole Philox blocks, between the threads: each thread
  // generates its own tiles and runs single-threaded GEMMs into its own columns, so the
  // tiles stay in its cache and no reduction is needed. With one chunk (small k or one
  // thread), generation and BLAS are parallel inside instead.
  const int64_t blocks = (k + kRademacherBlockCols - 1) / kRademacherBlockCols;
  const int64_t chunks = std::min<int64_t>(blocks, at::get_num_threads());
  const int64_t chunk_cols = ((blocks + chunks - 1) / chunks) * kRademacherBlockCols;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t col0 = chunk * chunk_cols, col1 = std::min(k, col0 + chunk_cols);
      if (col0 < col1)
        project_columns(acc, grads, static_cast<uint64_t>(seed), kind, feature_offset, scale,
                        col0, col1);
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
