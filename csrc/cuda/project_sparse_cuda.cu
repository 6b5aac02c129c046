// CUDA kernels for kind="sparse" (the matrix is defined in trak_fast/sparse_matrix.h).
//
// A gather, not a scatter: output column j lies in exactly one group l (columns
// [start_l, start_l + m_l)), and receives exactly one group-l nonzero from each block of m_l
// consecutive rows, the row b * m_l + sigma_{l,b}^{-1}(j - start_l). So
//
//   out[:, j] += scale * sum over blocks b of s_l(i_b) * g[:, i_b]
//
// and a thread computes that sum for one column j and a chunk of 8 batch rows, over a range
// of blocks, in increasing block order. The block range is cut into `splits` pieces (a
// function of the shapes alone) so that there are enough threads; each split writes its
// partial sums to a [splits, B, k] buffer and a second kernel adds partial_0 + partial_1 + ...
// into out in that fixed order. No atomics, no stored indices: bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../project.h"
#include "trak_fast/sparse_matrix.h"

namespace trak_fast {
namespace {

constexpr int kColsPerBlock = 128;  // threads per block, one output column each
constexpr int kBatchPerThread = 8;
constexpr int64_t kBlocksPerSplit = 256;
constexpr int64_t kMaxSplits = 64;

// partial[split, b, j] = sum over the split's row blocks of scale * s_l(i) * g[b, i - offset]
// for b in [b0, b0 + 8), where i runs over the rows that reach column j.
template <typename in_t, typename acc_t>
__global__ void sparse_gather_kernel(acc_t* __restrict__ partial, const in_t* __restrict__ g,
                                     int64_t g_s0, int64_t g_s1, int64_t batch, int64_t width,
                                     int64_t k, int64_t nnz, uint64_t seed, uint64_t offset,
                                     int64_t splits, acc_t scale) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * kBatchPerThread;
  if (j >= k) return;
  // The group of column j: the l with start_l <= j < start_{l+1}.
  int64_t l = (j * nnz) / k;
  while (l + 1 < nnz && sparse_group_start(l + 1, k, nnz) <= j) ++l;
  while (l > 0 && sparse_group_start(l, k, nnz) > j) --l;
  const int64_t start = sparse_group_start(l, k, nnz);
  const uint64_t m = static_cast<uint64_t>(sparse_group_start(l + 1, k, nnz) - start);
  const uint32_t target = static_cast<uint32_t>(j - start);
  // The row blocks that meet [offset, offset + width), cut into `splits` ranges.
  const uint64_t first = offset / m, last = (offset + width - 1) / m;
  const uint64_t count = last - first + 1;
  // Split s gets blocks [first + s * q + min(s, r), ...): q = count / splits, r = count % splits.
  const uint64_t q_ = count / splits, r_ = count % splits, us = static_cast<uint64_t>(split);
  const uint64_t lo = first + us * q_ + (us < r_ ? us : r_);
  const uint64_t hi = lo + q_ + (us < r_ ? 1 : 0);
  const int64_t nb = batch - b0 < kBatchPerThread ? batch - b0 : kBatchPerThread;
  acc_t sum[kBatchPerThread];
#pragma unroll
  for (int q = 0; q < kBatchPerThread; ++q) sum[q] = acc_t(0);
  for (uint64_t block = lo; block < hi; ++block) {
    const SparsePerm perm = sparse_perm(seed, block, static_cast<uint32_t>(l), static_cast<uint32_t>(m));
    const uint64_t row = block * m + sparse_unpermute(perm, target);
    if (row < offset || row >= offset + static_cast<uint64_t>(width)) continue;
    const bool negative = (sparse_sign_bits(seed, row) >> l) & 1u;
    const in_t* src = g + static_cast<int64_t>(row - offset) * g_s1 + b0 * g_s0;
#pragma unroll
    for (int q = 0; q < kBatchPerThread; ++q) {
      if (q < nb) {
        const acc_t v = scale * static_cast<acc_t>(src[q * g_s0]);
        sum[q] += negative ? -v : v;
      }
    }
  }
  acc_t* dst = partial + (split * batch + b0) * k + j;
  for (int q = 0; q < nb; ++q) dst[q * k] = sum[q];
}

// acc[b, j] += partial[0, b, j] + partial[1, b, j] + ... (in that order).
template <typename acc_t>
__global__ void sparse_reduce_kernel(acc_t* __restrict__ acc, const acc_t* __restrict__ partial,
                                     int64_t elems, int64_t splits) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= elems) return;
  acc_t sum = partial[idx];
  for (int64_t s = 1; s < splits; ++s) sum += partial[s * elems + idx];
  acc[idx] += sum;
}

// Row r of R (scaled) into out[r, :], out zeroed beforehand: one thread per row.
template <typename scalar_t>
__global__ void fill_sparse_kernel(scalar_t* __restrict__ out, int64_t nrows, int64_t k,
                                   int64_t nnz, uint64_t seed, uint64_t row0, scalar_t scale) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= nrows) return;
  const uint64_t row = row0 + static_cast<uint64_t>(r);
  const uint64_t signs = sparse_sign_bits(seed, row);
  for (int64_t l = 0; l < nnz; ++l) {
    const int64_t col = sparse_column(seed, row, l, k, nnz);
    out[r * k + col] = ((signs >> l) & 1u) ? -scale : scale;
  }
}

}  // namespace

void project_sparse_add_cuda(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t nnz,
                             int64_t feature_offset, double scale) {
  check_sparse_project_args(out, grads, seed, nnz, feature_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t batch = out.size(0), k = out.size(1);
  if (batch == 0) return;
  at::Tensor acc = out.is_contiguous() ? out : out.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m_min = k / nnz;  // the smallest group
  const int64_t batch_chunks = (batch + kBatchPerThread - 1) / kBatchPerThread;
  TORCH_CHECK(batch_chunks < 65536, "trak_fast: batch too large for one launch (", batch, ")");
  int64_t offset = feature_offset;
  for (const at::Tensor& piece : grads) {
    const at::Tensor g = piece.reshape({batch, -1});
    const int64_t width = g.size(1);
    if (width == 0) continue;
    const int64_t blocks = width / m_min + 2;
    const int64_t splits = std::min(kMaxSplits, (blocks + kBlocksPerSplit - 1) / kBlocksPerSplit);
    at::Tensor partial = at::empty({splits, batch, k}, out.options());
    const dim3 grid(static_cast<unsigned>((k + kColsPerBlock - 1) / kColsPerBlock),
                    static_cast<unsigned>(splits), static_cast<unsigned>(batch_chunks));
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trak_fast_project_sparse_cuda", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                      "trak_fast_project_sparse_cuda_in", [&] {
        sparse_gather_kernel<scalar_t, acc_t><<<grid, kColsPerBlock, 0, stream>>>(
            partial.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), batch,
            width, k, nnz, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), splits,
            static_cast<acc_t>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      const int64_t elems = batch * k;
      const int threads = 256;
      sparse_reduce_kernel<acc_t><<<static_cast<unsigned>((elems + threads - 1) / threads), threads,
                                    0, stream>>>(acc.data_ptr<acc_t>(), partial.data_ptr<acc_t>(),
                                                 elems, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    offset += width;
  }
  if (!acc.is_same(out)) out.copy_(acc);
}

void fill_sparse_matrix_cuda(const at::Tensor& out, int64_t seed, int64_t nnz, int64_t feature_offset,
                             double scale) {
  check_sparse_matrix_args(out, seed, nnz, feature_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.size(0), k = out.size(1);
  out.zero_();
  if (n == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t rows_per_launch = int64_t(1) << 30;
  for (int64_t row0 = 0; row0 < n; row0 += rows_per_launch) {
    const int64_t nrows = std::min(rows_per_launch, n - row0);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trak_fast_fill_sparse_cuda", [&] {
      fill_sparse_kernel<scalar_t><<<static_cast<unsigned>((nrows + threads - 1) / threads), threads,
                                     0, stream>>>(out.data_ptr<scalar_t>() + row0 * k, nrows, k, nnz,
                                                  static_cast<uint64_t>(seed),
                                                  static_cast<uint64_t>(feature_offset + row0),
                                                  static_cast<scalar_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

TORCH_LIBRARY_IMPL(trak_fast, CUDA, m) {
  m.impl("project_sparse_add_", &project_sparse_add_cuda);
  m.impl("fill_sparse_matrix_", &fill_sparse_matrix_cuda);
}

}  // namespace trak_fast
