// CPU kernels for kind="sparse" (the matrix is defined in trak_fast/sparse_matrix.h).
//
// out[b, col_l(i)] += scale * s_l(i) * g[b, i] for every feature i and l < c.
//
// The work is cut into units, each owning a range of batch rows and a range of column
// groups l (the groups own disjoint columns). A unit walks the features in tiles of
// kRowsPerTile: it generates the tile's sign bits and its groups' columns into its own small
// buffer, then scatters its rows of g into its part of out, kept transposed ([k, rows of the
// unit]) so that a nonzero adds one contiguous vector. Every out[b, j] is therefore
// summed by one unit, in increasing feature order, so the bits do not depend on how the
// units are cut or on the thread count, and no atomics or reductions are needed. There is
// one parallel region and no barrier (barriers cost milliseconds each on a loaded machine).
// Units generate their tiles' indices independently: with U units that is U * n * c / c_u
// permutation evaluations, cheap next to the scatter (the batch is split first, groups
// only when there are fewer batch rows than threads). Extra memory, whatever n is: per
// unit, the index buffers (kRowsPerTile * (4c + 8) bytes), its transposed accumulator
// (k * rows) and its transposed tile of g (kRowsPerTile * rows), so at most
// 4 (k + kRowsPerTile) * B bytes in float32 over all units.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../project.h"
#include "trak_fast/sparse_matrix.h"

namespace trak_fast {
namespace {

constexpr int64_t kRowsPerTile = 1024;

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

// accT[col, q] += +-v[r, q] for every row r of the tile and each of its groups' columns,
// rows in order. accT is the unit's [k, nb] transposed accumulator and v its [nrows, nb]
// transposed, scaled tile of g, so each nonzero is one contiguous vector add of nb lanes.
// CL (the number of groups) fixed at compile time for common values (CL = 0: runtime).
template <typename scalar_t, int CL>
void scatter_tile(scalar_t* __restrict__ accT, const scalar_t* __restrict__ v, int64_t nb,
                  int64_t nrows, int64_t cl_runtime, int64_t l0, const int32_t* __restrict__ cols,
                  const uint64_t* __restrict__ signs) {
  const int64_t cl = CL > 0 ? CL : cl_runtime;
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* __restrict__ vr = v + r * nb;
    const uint64_t s = signs[r] >> l0;
    const int32_t* col = cols + r * cl;
    for (int64_t t = 0; t < cl; ++t) {
      scalar_t* __restrict__ a = accT + static_cast<int64_t>(col[t]) * nb;
      // a + (-x) and a - x are the same IEEE operation.
      if ((s >> t) & 1u) {
        for (int64_t q = 0; q < nb; ++q) a[q] -= vr[q];
      } else {
        for (int64_t q = 0; q < nb; ++q) a[q] += vr[q];
      }
    }
  }
}

template <typename scalar_t>
void scatter_tile_any(scalar_t* accT, const scalar_t* v, int64_t nb, int64_t nrows, int64_t cl,
                      int64_t l0, const int32_t* cols, const uint64_t* signs) {
  switch (cl) {
    case 1: return scatter_tile<scalar_t, 1>(accT, v, nb, nrows, cl, l0, cols, signs);
    case 2: return scatter_tile<scalar_t, 2>(accT, v, nb, nrows, cl, l0, cols, signs);
    case 4: return scatter_tile<scalar_t, 4>(accT, v, nb, nrows, cl, l0, cols, signs);
    case 8: return scatter_tile<scalar_t, 8>(accT, v, nb, nrows, cl, l0, cols, signs);
    case 16: return scatter_tile<scalar_t, 16>(accT, v, nb, nrows, cl, l0, cols, signs);
    default: return scatter_tile<scalar_t, 0>(accT, v, nb, nrows, cl, l0, cols, signs);
  }
}

}  // namespace

void project_sparse_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t nnz,
                            int64_t feature_offset, double scale) {
  check_sparse_project_args(out, grads, seed, nnz, feature_offset);
  const int64_t batch = out.size(0), k = out.size(1);
  if (batch == 0) return;
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
      const int64_t nb = b1 - b0;
      // The unit's columns of out, transposed: [k, nb] (only its groups' rows are touched).
      at::Tensor out_rows = out.narrow(0, b0, nb);
      at::Tensor accT = out_rows.t().contiguous();
      at::Tensor v = at::empty({kRowsPerTile, nb}, out.options());
      int64_t offset = feature_offset;
      for (const at::Tensor& g : pieces) {
        const int64_t width = g.size(1);
        for (int64_t row0 = 0; row0 < width; row0 += kRowsPerTile) {
          const int64_t nrows = std::min(kRowsPerTile, width - row0);
          sparse_rows(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + row0), nrows, k,
                      nnz, l0, l1, cols.data(), signs.data());
          // v = scale * g[b0:b1, tile], transposed to [nrows, nb], in the accumulator's
          // dtype: one tile at a time, so no full-size copy of g is made.
          at::Tensor slice = g.narrow(0, b0, nb).narrow(1, row0, nrows);
          if (slice.scalar_type() != dtype || (nrows > 1 && slice.stride(1) != 1))
            slice = slice.to(dtype).contiguous();
          AT_DISPATCH_FLOATING_TYPES(dtype, "trak_fast_project_sparse", [&] {
            const scalar_t s = static_cast<scalar_t>(scale);
            const scalar_t* src = slice.data_ptr<scalar_t>();
            const int64_t src_ld = slice.stride(0);
            scalar_t* vt = v.data_ptr<scalar_t>();
            for (int64_t q = 0; q < nb; ++q)
              for (int64_t r = 0; r < nrows; ++r) vt[r * nb + q] = s * src[q * src_ld + r];
            scatter_tile_any<scalar_t>(accT.data_ptr<scalar_t>(), vt, nb, nrows, l1 - l0, l0,
                                       cols.data(), signs.data());
          });
        }
        offset += width;
      }
      out_rows.copy_(accT.t());
    }
  });
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
