// The generate-then-GEMM strategy for precision="bf16":
//   acc[b, j] += scale * sum_i bf16(g[b, i]) * R[offset + i, j]
// computed chunk by chunk: the rows R[offset + c0 .. + kChunkRows) are written as bf16 into a
// workspace by a memory-bound fill kernel, then multiplied by cuBLAS through ATen
// (mm with bf16 operands and a float32 output: float32 accumulation; then acc += scale * that).
//
// Overlap: two workspace buffers and a second stream. The fill of chunk c + 1 (side stream)
// runs while the GEMM of chunk c (the caller's stream) does; events order them, the host never
// waits:
//   side: wait gemm_done[c % 2] (the GEMM of chunk c - 2 read that buffer); fill chunk c;
//         record fill_done[c % 2]
//   main: wait fill_done[c % 2]; GEMM chunk c; record gemm_done[c % 2]
// The side stream first waits for everything already queued on the caller's stream (the
// workspace memory may have been in use there before the caching allocator handed it out).
// Every side-stream fill is waited on by a later main-stream GEMM, so when this function
// returns, all work on the workspace is ordered before the caller's stream's next work.
//
// Determinism: the chunking (kChunkRows rows per GEMM) and the column blocks are functions of
// the shapes only; cuBLAS computes a given shape identically run after run on a given GPU
// (cuBLAS documents bitwise reproducibility for one architecture and SM count with the
// default per-stream workspace that ATen configures), and nothing here depends on timing.
// Unlike the fused kernel, a different GPU model may pick a different cuBLAS algorithm and
// so differ in the last bits.
//
// Truncation: tensor cores accumulate with truncation (see project_fast.cu); within one GEMM
// cuBLAS's accumulator sees kChunkRows / 16 = 1024 bf16 MMAs (fewer if it splits K): a bias
// below 1024 * 2^-23 = 1.2e-4 of the partial sum, and about 4e-5 expected (half an ulp per MMA
// of an accumulator that grows like sqrt(steps): 2^-24 * 1024 * 2/3); every chunk's partial sum
// is then added into acc by cuBLAS's float32 epilogue (alpha * acc + beta * C, rounded to
// nearest), which restarts the bias.
//
// Memory: 2 buffers x kChunkRows x cols x 2 bytes, cols = min(k, kMaxCols): at most 2 x 16384 x
// 4096 x 2 B = 256 MiB, plus the bf16 copy of one chunk of g ([B, 16384] x 2 B) when g is not
// already a bf16 view cuBLAS can read. If that cannot be allocated, the output columns are
// done in narrower blocks (halving down to 128 columns); nothing is refused.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>

#include "../project.h"
#include "project_fast.cuh"
#include "trak_fast/random_matrix.h"

// mm with a float32 out_dtype for bf16 operands (aten::mm.dtype_out) is in torch >= 2.9 (it
// came with 2.8); with an older torch this strategy declines and the fused kernel runs.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 9)
#define TRAK_FAST_HAS_MM_DTYPE 1
#else
#define TRAK_FAST_HAS_MM_DTYPE 0
#endif

namespace trak_fast {
namespace {

constexpr int64_t kChunkRows = int64_t(1) << 14;
constexpr int64_t kMaxCols = 4096;
constexpr int64_t kMinCols = 128;

__device__ __forceinline__ uint32_t bf16_sign_pair(uint32_t x) {
  // bf16 +1 is 0x3F80; bit 0 of x is the sign of the low half, bit 1 of the high half.
  return 0x3F803F80u | ((x & 1u) << 15) | ((x & 2u) << 30);
}

// Rademacher, bf16: one thread writes 32 consecutive entries of one row (one 32-bit word of a
// Philox call: 64 bytes, four 16-byte stores; the warp writes 2 KB contiguous per row when the
// row is long enough). dst[r * ld + c] = R[row0 + r, col0 + c], c < ncols; col0 is a multiple
// of 128, ld a multiple of 8 and dst 16-byte aligned, so full words are 16-byte aligned.
__global__ void fill_rademacher_bf16_kernel(__nv_bfloat16* __restrict__ dst, int64_t ld,
                                            int64_t nrows, int64_t ncols, uint64_t seed,
                                            uint64_t row0, int64_t col0) {
  const int64_t words_per_row = (ncols + 31) / 32;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= nrows * words_per_row) return;
  const int64_t r = idx / words_per_row;
  const int64_t w = idx % words_per_row;
  const uint64_t col = static_cast<uint64_t>(col0) + 32 * static_cast<uint64_t>(w);
  const Philox4 bits = rademacher_bits(seed, row0 + static_cast<uint64_t>(r),
                                       col / kRademacherBlockCols);
  const int q = static_cast<int>((col / 32) % 4);
  const uint32_t word = (q & 2) ? ((q & 1) ? bits.w[3] : bits.w[2])
                                : ((q & 1) ? bits.w[1] : bits.w[0]);
  __nv_bfloat16* out = dst + r * ld + 32 * w;
  const int64_t len = ncols - 32 * w;
  if (len >= 32) {
#pragma unroll
    for (int t = 0; t < 32; t += 8) {
      uint4 v;
      v.x = bf16_sign_pair(word >> t);
      v.y = bf16_sign_pair(word >> (t + 2));
      v.z = bf16_sign_pair(word >> (t + 4));
      v.w = bf16_sign_pair(word >> (t + 6));
      *reinterpret_cast<uint4*>(out + t) = v;
    }
  } else {
    for (int t = 0; t < len; ++t) {
      out[t] = __ushort_as_bfloat16(static_cast<unsigned short>(
          0x3F80u | (((word >> t) & 1u) << 15)));
    }
  }
}

// Gaussian, bf16: one thread per 4 entries (one Philox call), rounded to bf16 (RNE), as the
// fused kernel rounds them.
__global__ void fill_gaussian_bf16_kernel(__nv_bfloat16* __restrict__ dst, int64_t ld,
                                          int64_t nrows, int64_t ncols, uint64_t seed,
                                          uint64_t row0, int64_t col0) {
  const int64_t groups_per_row = (ncols + 3) / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= nrows * groups_per_row) return;
  const int64_t r = idx / groups_per_row;
  const int64_t c = (idx % groups_per_row) * 4;
  float v[4];
  gaussian_block(seed, row0 + static_cast<uint64_t>(r),
                 static_cast<uint64_t>(col0 + c) / kGaussianBlockCols, v);
  __nv_bfloat16* out = dst + r * ld + c;
  const int64_t len = ncols - c < 4 ? ncols - c : 4;
  for (int t = 0; t < len; ++t) out[t] = __float2bfloat16_rn(v[t]);
}

void launch_fill_bf16(const at::Tensor& buf, int64_t nrows, int64_t ncols, uint64_t seed,
                      int64_t kind, uint64_t row0, int64_t col0, cudaStream_t stream) {
  const int64_t per_row = kind == kGaussian ? (ncols + 3) / 4 : (ncols + 31) / 32;
  const int64_t total = nrows * per_row;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "trak_fast: workspace chunk too large");
  auto* dst = reinterpret_cast<__nv_bfloat16*>(buf.data_ptr());
  const int64_t ld = buf.stride(0);
  if (kind == kGaussian) {
    fill_gaussian_bf16_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        dst, ld, nrows, ncols, seed, row0, col0);
  } else {
    fill_rademacher_bf16_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        dst, ld, nrows, ncols, seed, row0, col0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Event {
  cudaEvent_t e = nullptr;
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~Event() {
    if (e != nullptr) cudaEventDestroy(e);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

// acc[:, col0 : col0 + ncols] += scale * g @ R[offset:, col0 : col0 + ncols], chunk by chunk,
// with the two workspace buffers `bufs` ([kChunkRows, >= ncols] bf16).
void gemm_columns(const at::Tensor& acc, const at::Tensor& g, uint64_t seed, int64_t kind,
                  int64_t offset, double scale, int64_t col0, int64_t ncols, at::Tensor bufs[2],
                  const c10::cuda::CUDAStream& main, const c10::cuda::CUDAStream& side) {
  const int64_t width = g.size(1);
  const int64_t chunks = (width + kChunkRows - 1) / kChunkRows;
  at::Tensor acc_cols = acc.narrow(1, col0, ncols);
  at::Tensor partial = at::empty({acc.size(0), ncols}, acc.options());
  Event start, fill_done[2], gemm_done[2];
  C10_CUDA_CHECK(cudaEventRecord(start.e, main.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), start.e, 0));
  // g already bf16 and readable by cuBLAS (unit stride along features) needs no copy.
  const bool g_direct = g.scalar_type() == at::kBFloat16 && g.stride(1) == 1;
  for (int64_t c = 0; c < chunks; ++c) {
    const int b = static_cast<int>(c % 2);
    const int64_t r0 = c * kChunkRows;
    const int64_t nrows = std::min(kChunkRows, width - r0);
    if (c >= 2) C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), gemm_done[b].e, 0));
    launch_fill_bf16(bufs[b], nrows, ncols, seed, kind, static_cast<uint64_t>(offset + r0), col0,
                     side.stream());
    C10_CUDA_CHECK(cudaEventRecord(fill_done[b].e, side.stream()));

    C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), fill_done[b].e, 0));
    at::Tensor g_c = g.narrow(1, r0, nrows);
    if (!g_direct) g_c = g_c.to(at::kBFloat16);  // round to nearest even, as the fused kernel
    const at::Tensor p_c = bufs[b].narrow(0, 0, nrows).narrow(1, 0, ncols);
    // bf16 x bf16 -> float32 (float32 accumulation), then acc += scale * partial, rounded to
    // nearest. (addmm with a float32 `self` and bf16 operands is not accepted by every torch
    // release; the separate add costs one read and write of [B, cols] floats per chunk.)
#if TRAK_FAST_HAS_MM_DTYPE
    at::mm_out(partial, g_c, p_c, at::kFloat);
#endif
    acc_cols.add_(partial, scale);
    C10_CUDA_CHECK(cudaEventRecord(gemm_done[b].e, main.stream()));
  }
}

}  // namespace

int64_t gemm_workspace_cols(int64_t k) { return std::min(k, kMaxCols); }

bool project_add_cuda_gemm(const at::Tensor& acc, const at::Tensor& g, uint64_t seed,
                           int64_t kind, int64_t offset, double scale, int64_t precision) {
  if (!TRAK_FAST_HAS_MM_DTYPE || precision != kBf16 || acc.scalar_type() != at::kFloat ||
      !acc.is_contiguous() || acc.dim() != 2 || g.dim() != 2) {
    return false;
  }
  const at::ScalarType in = g.scalar_type();
  if (in != at::kFloat && in != at::kHalf && in != at::kBFloat16) return false;
  TORCH_CHECK(g.size(0) == acc.size(0), "trak_fast: g has ", g.size(0), " rows, acc has ",
              acc.size(0));
  const int64_t k = acc.size(1), width = g.size(1);
  if (g.size(0) == 0 || width == 0 || k == 0) return true;
  const c10::cuda::CUDAGuard guard(acc.device());
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return false;  // bf16 GEMMs need sm_80

  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
  // Row pitch a multiple of 8 bf16 (16 bytes): the fill's vector stores and cuBLAS's
  // alignment preferences.
  const int64_t rows = std::min(kChunkRows, width);
  int64_t cols = gemm_workspace_cols(k);
  at::Tensor bufs[2];
  while (true) {
    try {
      const int64_t pitch = (cols + 7) / 8 * 8;
      bufs[0] = at::empty({rows, pitch}, acc.options().dtype(at::kBFloat16));
      bufs[1] = at::empty({rows, pitch}, acc.options().dtype(at::kBFloat16));
      break;
    } catch (const c10::OutOfMemoryError&) {
      bufs[0] = at::Tensor();
      bufs[1] = at::Tensor();
      TORCH_CHECK(cols > kMinCols, "trak_fast: out of GPU memory for even a ", kMinCols,
                  "-column workspace (2 x ", rows, " x ", kMinCols, " bf16)");
      cols = std::max(kMinCols, (cols / 2 + kMinCols - 1) / kMinCols * kMinCols);
    }
  }
  for (int64_t col0 = 0; col0 < k; col0 += cols) {
    gemm_columns(acc, g, seed, kind, offset, scale, col0, std::min(cols, k - col0), bufs, main,
                 side);
  }
  return true;
}

}  // namespace trak_fast
