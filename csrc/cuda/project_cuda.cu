// CUDA registrations. The fast fused kernel lives in project_fast.cu; this file holds
// the simple path every other case takes (tiles of R generated on the GPU from the
// shared header, multiplied with at::addmm) and projection_matrix on CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../project.h"
#include "project_fast.cuh"
#include "trak_fast/random_matrix.h"

namespace trak_fast {
namespace {

constexpr int64_t kTileRows = 4096;
constexpr int64_t kTileCols = 4096;

// One thread writes 4 consecutive entries of one row: R[row0 + r, col0 + 4q .. +4).
// col0 is a multiple of 128, so a group of 4 never straddles a Philox block.
template <typename scalar_t>
__global__ void fill_tile_kernel(scalar_t* __restrict__ dst, int64_t ld, int64_t nrows,
                                 int64_t ncols, uint64_t seed, int64_t kind, uint64_t row0,
                                 int64_t col0, float scale_f, double scale_d, bool apply_scale) {
  const int64_t groups_per_row = (ncols + 3) / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= nrows * groups_per_row) return;
  const int64_t r = idx / groups_per_row;
  const int64_t c = (idx % groups_per_row) * 4;
  const uint64_t row = row0 + static_cast<uint64_t>(r);
  const uint64_t col = static_cast<uint64_t>(col0 + c);
  float vals[4];
  if (kind == kGaussian) {
    gaussian_block(seed, row, col / kGaussianBlockCols, vals);
  } else {
    const Philox4 bits = rademacher_bits(seed, row, col / kRademacherBlockCols);
    const uint32_t word = bits.w[(col / 32) % 4];
#pragma unroll
    for (int t = 0; t < 4; ++t) vals[t] = ((word >> ((col + t) % 32)) & 1u) ? -1.0f : 1.0f;
  }
  scalar_t* out = dst + r * ld + c;
  const int64_t len = ncols - c < 4 ? ncols - c : 4;
  for (int t = 0; t < len; ++t) {
    if (!apply_scale) {
      out[t] = static_cast<scalar_t>(vals[t]);
    } else if (sizeof(scalar_t) == sizeof(float)) {
      out[t] = static_cast<scalar_t>(tf_mul(vals[t], scale_f));
    } else {
      out[t] = static_cast<scalar_t>(static_cast<double>(vals[t]) * scale_d);
    }
  }
}

void launch_fill(const at::Tensor& dst, int64_t ld, int64_t nrows, int64_t ncols, uint64_t seed,
                 int64_t kind, uint64_t row0, int64_t col0, double scale, bool apply_scale) {
  const int64_t threads_total = nrows * ((ncols + 3) / 4);
  if (threads_total == 0) return;
  const int threads = 256;
  const int64_t blocks = (threads_total + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "trak_fast: tile too large for one launch");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "trak_fast_fill_tile_cuda", [&] {
    fill_tile_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        dst.data_ptr<scalar_t>(), ld, nrows, ncols, seed, kind, row0, col0,
        static_cast<float>(scale), scale, apply_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

// The rule, until a GPU measurement sets it (benchmarks/NOTES_cuda.md): generate-then-GEMM for
// precision="bf16" with batch >= 128 and k >= 256, the fused kernel otherwise. Why: the
// GEMM path pays for writing and reading P (4 bytes per entry of P in bf16: 2 written by the
// fill, 2 read by cuBLAS) whatever the batch, the fused kernel pays nothing per entry of P
// beyond generating it but reaches a smaller share of the tensor cores (predicted ~30%). At
// H200 rates (~790 TFLOP/s bf16, ~4.3 TB/s) they break even near
// batch = 0.3 * 790e12 * 4 bytes / (2 * 4.3e12) ~ 110 rows; at k < 256 cuBLAS tiles are mostly
// empty. tf32 and fp32 stay fused (a tf32 GEMM through ATen would need the process-wide TF32
// switch).
Strategy choose_strategy(int64_t batch, int64_t k, int64_t precision) {
  const char* env = std::getenv("TRAK_FAST_CUDA_STRATEGY");
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0) {
    if (std::strcmp(env, "fused") == 0) return Strategy::kFused;
    if (std::strcmp(env, "gemm") == 0) return Strategy::kGemm;
    TORCH_CHECK(false, "trak_fast: environment variable TRAK_FAST_CUDA_STRATEGY must be "
                "'auto', 'fused' or 'gemm', got '", env, "'");
  }
  return precision == kBf16 && batch >= 128 && k >= 256 ? Strategy::kGemm : Strategy::kFused;
}

void project_add_cuda(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                      int64_t feature_offset, double scale, int64_t precision) {
  check_project_args(out, grads, seed, kind, feature_offset, precision);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t batch = out.size(0), k = out.size(1);
  if (batch == 0 || k == 0) return;
  at::Tensor acc = out.is_contiguous() ? out : out.contiguous();
  const at::ScalarType dtype = out.scalar_type();
  at::Tensor tile;
  const Strategy strategy = choose_strategy(batch, k, precision);

  int64_t offset = feature_offset;
  for (const at::Tensor& piece : grads) {
    const at::Tensor g = piece.reshape({batch, -1});
    const int64_t width = g.size(1);
    if (width == 0) continue;
    // GEMM strategy first when chosen (it declines what it does not cover: not bf16, float64,
    // an old GPU), then the fused kernel, then the simple tiled path.
    const bool done =
        (strategy == Strategy::kGemm &&
         project_add_cuda_gemm(acc, g, static_cast<uint64_t>(seed), kind, offset, scale,
                               precision)) ||
        project_add_cuda_fast(acc, g, static_cast<uint64_t>(seed), kind, offset, scale,
                              precision);
    if (!done) {
      const int64_t tile_cols = std::min(k, kTileCols);
      if (!tile.defined()) tile = at::empty({kTileRows, tile_cols}, out.options());
      for (int64_t col0 = 0; col0 < k; col0 += tile_cols) {
        const int64_t ncols = std::min(tile_cols, k - col0);
        at::Tensor acc_cols = acc.narrow(1, col0, ncols);
        for (int64_t row0 = 0; row0 < width; row0 += kTileRows) {
          const int64_t nrows = std::min(kTileRows, width - row0);
          launch_fill(tile, tile_cols, nrows, ncols, static_cast<uint64_t>(seed), kind,
                      static_cast<uint64_t>(offset + row0), col0, 1.0, false);
          const at::Tensor g_slice = g.narrow(1, row0, nrows).to(dtype);
          acc_cols.addmm_(g_slice, tile.narrow(0, 0, nrows).narrow(1, 0, ncols), 1, scale);
        }
      }
    }
    offset += width;
  }
  if (!acc.is_same(out)) out.copy_(acc);
}

void fill_projection_matrix_cuda(const at::Tensor& out, int64_t seed, int64_t kind,
                                 int64_t feature_offset, double scale) {
  check_matrix_args(out, seed, kind, feature_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.size(0), k = out.size(1);
  // One launch per block of rows keeps the grid size in range for any n.
  const int64_t rows_per_launch = std::max<int64_t>(1, (int64_t(1) << 28) / std::max<int64_t>(k, 1));
  for (int64_t row0 = 0; row0 < n; row0 += rows_per_launch) {
    const int64_t nrows = std::min(rows_per_launch, n - row0);
    launch_fill(out.narrow(0, row0, nrows), k, nrows, k, static_cast<uint64_t>(seed), kind,
                static_cast<uint64_t>(feature_offset + row0), 0, scale, true);
  }
}

TORCH_LIBRARY_IMPL(trak_fast, CUDA, m) {
  m.impl("project_add_", &project_add_cuda);
  m.impl("fill_projection_matrix_", &fill_projection_matrix_cuda);
}

}  // namespace trak_fast
