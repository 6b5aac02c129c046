// CPU kernels for kind="sparse" (the matrix is defined in trak_fast/sparse_matrix.h).
//
// out[b, col_l(i)] += scale * s_l(i) * g[b, i] for every feature i and l < c.
//
// The work is cut into units, each owning a range of batch rows and a range of column
// groups l (the groups own disjoint columns). A unit walks the features in tiles of
// kRowsPerTile: it generates the tile's sign bits and its groups' columns into its own small
// buffer, then scatters its rows of g into its part of out. Every out[b, j] is therefore
// summed by one unit, in increasing feature order, so the bits do not depend on how the
// units are cut or on the thread count, and no atomics or reductions are needed. There is
// one parallel region and no barrier (barriers cost milliseconds each on a loaded machine).
// Units generate their tiles' indices independently: with U units that is U * n * c / c_u
// permutation evaluations, cheap next to the scatter (the batch is split first, groups
// only when there are fewer batch rows than threads). Extra memory: the per-unit tile
// buffers (kRowsPerTile * (4c + 8) bytes), whatever n is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../project.h"
#include "trak_fast/sparse_matrix.h"

namespace trak_fast {
namespace {

constexpr int64_t kRowsPerTile = 4096;

// Sign bits (signs[r]) and the columns of groups l0 .. l1 - 1 (cols[r * (l1 - l0) + l - l0])
// of rows row0 .. row0 + nrows - 1.
void sparse_rows(uint64_t seed, uint64_t row0, int64_t nrows, int64_t k, int64_t c, int64_t l0,
                 int64_t l1, int32_t* cols, uint64_t* signs) {
  const int64_t cl = l1 - l0;
  for (int64_t r = 0; r < nrows; ++r) signs[r] = sparse_sign_bits(seed, row0 + r);
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t start = sparse_group_start(l, k, c);
    const uint64_t m = static_cast<uint64_t>(sparse_group_start(l + 1, k, c) - start);
    uint64_t block = row0 / m;
    uint64_t p = row0 - block * m;
    SparsePerm perm = sparse_perm(seed, block, static_cast<uint32_t>(l), static_cast<uint32_t>(m));
    int32_t* dst = cols + (l - l0);
    for (int64_t r = 0; r < nrows; ++r) {
      dst[r * cl] = static_cast<int32_t>(start + sparse_permute(perm, static_cast<uint32_t>(p)));
      if (++p == m) {
        p = 0;
        ++block;
        perm = sparse_perm(seed, block, static_cast<uint32_t>(l), static_cast<uint32_t>(m));
      }
    }
  }
}

// Batch rows b0 .. b0 + NB - 1 at once (they share each row's columns and signs, which are
// loaded once for all NB): o_b[cols[r * CL + t]] += +-(scale * g_b[r]), sign bit l0 + t.
// CL fixed at compile time for common group counts (CL = 0: runtime).
template <typename scalar_t, int NB, int CL>
void scatter_block(scalar_t* __restrict__ o, int64_t ld, const scalar_t* __restrict__ g,
                   int64_t g_ld, int64_t nrows, int64_t cl_runtime, int64_t l0,
                   const int32_t* __restrict__ cols, const uint64_t* __restrict__ signs,
                   scalar_t scale) {
  const int64_t cl = CL > 0 ? CL : cl_runtime;
  for (int64_t r = 0; r < nrows; ++r) {
    scalar_t v[NB];
    for (int q = 0; q < NB; ++q) v[q] = scale * g[q * g_ld + r];
    const uint64_t s = signs[r] >> l0;
    const int32_t* col = cols + r * cl;
    for (int64_t t = 0; t < cl; ++t) {
      const bool negative = (s >> t) & 1u;
      const int32_t j = col[t];
      for (int q = 0; q < NB; ++q) o[q * ld + j] += negative ? -v[q] : v[q];
    }
  }
}

template <typename scalar_t, int NB>
void scatter_block_any(scalar_t* o, int64_t ld, const scalar_t* g, int64_t g_ld, int64_t nrows,
                       int64_t cl, int64_t l0, const int32_t* cols, const uint64_t* signs,
                       scalar_t s) {
  switch (cl) {
    case 1: return scatter_block<scalar_t, NB, 1>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
    case 2: return scatter_block<scalar_t, NB, 2>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
    case 4: return scatter_block<scalar_t, NB, 4>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
    case 8: return scatter_block<scalar_t, NB, 8>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
    case 16: return scatter_block<scalar_t, NB, 16>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
    default: return scatter_block<scalar_t, NB, 0>(o, ld, g, g_ld, nrows, cl, l0, cols, signs, s);
  }
}

// Batch rows [0, nb) of acc (leading dimension ld) from the rows of g (leading dimension
// g_ld), four at a time. Each out element's sum runs over r in order either way.
template <typename scalar_t>
void scatter_rows(scalar_t* acc, int64_t ld, const scalar_t* g, int64_t g_ld, int64_t nb,
                  int64_t nrows, int64_t l0, int64_t l1, const int32_t* cols, const uint64_t* signs,
                  scalar_t s) {
  const int64_t cl = l1 - l0;
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4)
    scatter_block_any<scalar_t, 4>(acc + b * ld, ld, g + b * g_ld, g_ld, nrows, cl, l0, cols, signs, s);
  for (; b < nb; ++b)
    scatter_block_any<scalar_t, 1>(acc + b * ld, ld, g + b * g_ld, g_ld, nrows, cl, l0, cols, signs, s);
}

}  // namespace

void project_sparse_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t nnz,
                            int64_t feature_offset, double scale) {
  check_sparse_project_args(out, grads, seed, nnz, feature_offset);
  const int64_t batch = out.size(0), k = out.size(1);
  if (batch == 0) return;
  at::Tensor acc = out.is_contiguous() ? out : out.contiguous();
  const at::ScalarType dtype = out.scalar_type();
  // [B, width] views of the pieces (a non-viewable piece is copied once, here).
  std::vector<at::Tensor> pieces;
  for (const at::Tensor& piece : grads) pieces.push_back(piece.reshape({batch, -1}));
  // Units: batch ranges first, then group ranges while there are threads to spare. Any cut
  // gives the same bits (see the top of the file).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t batch_units = std::min(batch, threads);
  const int64_t group_units = std::min(nnz, std::max<int64_t>(1, threads / batch_units));
  at::parallel_for(0, batch_units * group_units, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cols(kRowsPerTile * nnz);
    std::vector<uint64_t> signs(kRowsPerTile);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bu = unit / group_units, gu = unit % group_units;
      const int64_t b0 = batch * bu / batch_units, b1 = batch * (bu + 1) / batch_units;
      const int64_t l0 = nnz * gu / group_units, l1 = nnz * (gu + 1) / group_units;
      int64_t offset = feature_offset;
      for (const at::Tensor& g : pieces) {
        const int64_t width = g.size(1);
        for (int64_t row0 = 0; row0 < width; row0 += kRowsPerTile) {
          const int64_t nrows = std::min(kRowsPerTile, width - row0);
          sparse_rows(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + row0), nrows, k,
                      nnz, l0, l1, cols.data(), signs.data());
          // The unit's [b1 - b0, nrows] slice of g, with contiguous rows in the
          // accumulator's dtype: fp16 / bf16 or column-major input is converted one slice
          // at a time, so no full-size copy is made.
          at::Tensor slice = g.narrow(0, b0, b1 - b0).narrow(1, row0, nrows);
          if (slice.scalar_type() != dtype || (nrows > 1 && slice.stride(1) != 1))
            slice = slice.to(dtype).contiguous();
          AT_DISPATCH_FLOATING_TYPES(dtype, "trak_fast_project_sparse", [&] {
            scatter_rows<scalar_t>(acc.data_ptr<scalar_t>() + b0 * k, k, slice.data_ptr<scalar_t>(),
                                   slice.stride(0), b1 - b0, nrows, l0, l1, cols.data(),
                                   signs.data(), static_cast<scalar_t>(scale));
          });
        }
        offset += width;
      }
    }
  });
  if (!acc.is_same(out)) out.copy_(acc);
}

void fill_sparse_matrix_cpu(const at::Tensor& out, int64_t seed, int64_t nnz, int64_t feature_offset,
                            double scale) {
  check_sparse_matrix_args(out, seed, nnz, feature_offset);
  const int64_t n = out.size(0), k = out.size(1);
  out.zero_();
  const int64_t tiles = (n + kRowsPerTile - 1) / kRowsPerTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cols(kRowsPerTile * nnz);
    std::vector<uint64_t> signs(kRowsPerTile);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row0 = tile * kRowsPerTile, nrows = std::min(kRowsPerTile, n - row0);
      sparse_rows(static_cast<uint64_t>(seed), static_cast<uint64_t>(feature_offset + row0), nrows,
                  k, nnz, 0, nnz, cols.data(), signs.data());
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trak_fast_fill_sparse_matrix", [&] {
        scalar_t* dst = out.data_ptr<scalar_t>() + row0 * k;
        const scalar_t s = static_cast<scalar_t>(scale);
        for (int64_t r = 0; r < nrows; ++r)
          for (int64_t l = 0; l < nnz; ++l)
            dst[r * k + cols[r * nnz + l]] = ((signs[r] >> l) & 1u) ? -s : s;
      });
    }
  });
}

TORCH_LIBRARY_IMPL(trak_fast, CPU, m) {
  m.impl("project_sparse_add_", &project_sparse_add_cpu);
  m.impl("fill_sparse_matrix_", &fill_sparse_matrix_cpu);
}

}  // namespace trak_fast
