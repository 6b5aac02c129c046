// CPU kernels: generate tiles of R into a small buffer, multiply them with BLAS.
//
// out[:, cols] += scale * G[:, rows] @ R[rows, cols], one tile of R at a time. The tile
// buffer is the only extra memory (at most kTileRows x kTileCols), whatever n is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "../project.h"
#include "trak_fast/random_matrix.h"

namespace trak_fast {
namespace {

constexpr int64_t kTileRows = 512;
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
  } else {
    float block[kGaussianBlockCols];
    for (int64_t c = 0; c < ncols; c += kGaussianBlockCols) {
      gaussian_block(seed, row, (col0 + c) / kGaussianBlockCols, block);
      const int64_t len = std::min<int64_t>(kGaussianBlockCols, ncols - c);
      for (int64_t t = 0; t < len; ++t) dst[c + t] = static_cast<scalar_t>(block[t]);
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

void project_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                     int64_t feature_offset, double scale, int64_t precision) {
  check_project_args(out, grads, seed, kind, feature_offset, precision);
  const int64_t batch = out.size(0), k = out.size(1);
  if (batch == 0 || k == 0) return;
  const at::ScalarType dtype = out.scalar_type();
  const int64_t tile_cols = std::min(k, kTileCols);
  at::Tensor tile = at::empty({kTileRows, tile_cols}, out.options());
  // BLAS accumulates into a contiguous target; copy back only if out is strided.
  at::Tensor acc = out.is_contiguous() ? out : out.contiguous();

  int64_t offset = feature_offset;
  for (const at::Tensor& piece : grads) {
    const at::Tensor g = piece.reshape({batch, -1});
    const int64_t width = g.size(1);
    for (int64_t col0 = 0; col0 < k; col0 += tile_cols) {
      const int64_t ncols = std::min(tile_cols, k - col0);
      at::Tensor acc_cols = acc.narrow(1, col0, ncols);
      for (int64_t row0 = 0; row0 < width; row0 += kTileRows) {
        const int64_t nrows = std::min(kTileRows, width - row0);
        AT_DISPATCH_FLOATING_TYPES(dtype, "trak_fast_generate_tile", [&] {
          generate_tile<scalar_t>(kind, static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset + row0), nrows, col0, ncols,
                                  tile.data_ptr<scalar_t>(), tile_cols);
        });
        // Converts fp16 / bf16 one slice at a time, so no full-size copy is made.
        const at::Tensor g_slice = g.narrow(1, row0, nrows).to(dtype);
        const at::Tensor r_slice = tile.narrow(0, 0, nrows).narrow(1, 0, ncols);
        acc_cols.addmm_(g_slice, r_slice, /*beta=*/1, /*alpha=*/scale);
      }
    }
    offset += width;
  }
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
