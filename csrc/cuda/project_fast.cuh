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

}  // namespace trak_fast
