// The fused CUDA projection kernel (project_fast.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace trak_fast {

// acc[b, j] += scale * sum_i g[b, i] * R[offset + i, j] for one [B, width] piece.
// acc: contiguous [B, k] on the GPU; g: a [B, width] view of a piece (any strides).
// Returns false, having done nothing, when the fast kernel does not cover this case
// (float64 accumulator or input, a GPU older than sm_80, too little shared memory);
// the caller then takes the simple tiled path. Returns true when the work is done
// (including the empty case, where there is nothing to do).
bool project_add_cuda_fast(const at::Tensor& acc, const at::Tensor& g, uint64_t seed,
                           int64_t kind, int64_t offset, double scale, int64_t precision);

// The generate-then-GEMM strategy (project_gemm.cu), precision="bf16" only: P generated in
// chunks of rows into a bf16 workspace, multiplied by cuBLAS (through ATen) with float32
// accumulation. Same contract as project_add_cuda_fast; returns false for other precisions.
bool project_add_cuda_gemm(const at::Tensor& acc, const at::Tensor& g, uint64_t seed,
                           int64_t kind, int64_t offset, double scale, int64_t precision);

enum class Strategy { kFused, kGemm };

// Which strategy a [batch, k] projection in `precision` takes. A rule of the shapes and the
// precision only (see project_cuda.cu), unless the environment variable
// TRAK_FAST_CUDA_STRATEGY is "fused" or "gemm" ("auto" or unset: the rule). Any other value
// raises an error naming the variable.
Strategy choose_strategy(int64_t batch, int64_t k, int64_t precision);

}  // namespace trak_fast
