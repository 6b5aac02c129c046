// The fused CUDA projection kernel: acc[b, j] += scale * sum_i g[b, i] * R[offset + i, j],
// with R generated tile by tile in shared memory and never written to device memory.
//
// Work decomposition (all of it chosen from the shapes, never from the GPU):
//   * the output [B, k] is cut into BM x BN tiles (BN a multiple of 128, so that one
//     Philox call gives the 128 signs of one matrix row inside a tile);
//   * the feature dimension is cut into `splits` chunks of `chunk` features; a thread block
//     owns one (split, row tile, column tile) and walks its chunk kBlockK features at a time;
//   * per step, the block loads its [BM, kBlockK] slice of g into shared memory (converted to
//     the operand type) and generates the [kBlockK, BN] slice of R there once; every warp then
//     multiplies its part of the tile, so each generated entry of R serves BM rows of g;
//   * with one split, the block adds scale * (its sum) into acc; with several, each block
//     writes its partial sum to a [splits, B, k] buffer and a second kernel adds
//     scale * (partial_0 + partial_1 + ...) into acc in that fixed order. The tensor-core
//     paths flush their sums that way every 2048 features (see WmmaMath), not only at the end.
//     No atomics, so the result is bitwise reproducible, and the split never depends on the GPU.
//
// Arithmetic per `precision`:
//   fp32: CUDA-core FMA (float32 products and sums, as on the CPU);
//   tf32: tensor cores (WMMA m16n16k8), g rounded to tf32, float32 accumulation;
//   bf16: tensor cores (WMMA m16n16k16), g rounded to bf16, float32 accumulation.
// Rademacher entries (+-1) are exact in every operand type. Gaussian entries are rounded to
// the operand type as well (tf32 or bf16), so for Gaussian the tf32/bf16 modes round both
// factors.
//
// Pipeline: two shared-memory stages. While the warps multiply stage t, each thread holds the
// global loads for stage t + 1 in registers, then writes them (and the generated R slice) to
// the other stage; one __syncthreads per step.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../project.h"
#include "project_fast.cuh"
#include "project_fast_index.h"
#include "trak_fast/random_matrix.h"

// Tensor-core bf16/tf32 fragments need sm_80. The host pass (no __CUDA_ARCH__) sees
// everything; a device pass for an older architecture compiles empty kernels, which
// the host never launches there (it checks the compute capability first).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TRAK_FAST_SM80 1
#else
#define TRAK_FAST_SM80 0
#endif

namespace trak_fast {
namespace {

namespace wmma = nvcuda::wmma;

using fast_index::kBlockK;  // features per pipeline step
using fast_index::kThreads;
using fast_index::kWarps;
using fast_index::ceil_div;

enum class Math { kFp32Simt, kTf32Wmma, kBf16Wmma };

// Operand type in shared memory: bf16 for the bf16 tensor cores, float otherwise (tf32
// operands are floats whose low 13 mantissa bits are zero).
template <Math M>
using Operand = std::conditional_t<M == Math::kBf16Wmma, __nv_bfloat16, float>;

// ---- tile configurations -------------------------------------------------------------------
// WMMA: warps laid out kWarpsM x kWarpsN, each owning a (16 * kFragsM) x 64 piece of the
// output (kFragsM x 4 fragments of 16 x 16). SIMT (fp32): 8 warps stacked in M, each owning
// 8 rows x 256 columns; a lane holds 8 x 8 outputs (columns 4 * lane + 0..3 and 128 + 4 * lane
// + 0..3, so that its shared-memory reads of R are 16-byte and conflict-free).
template <Math M, int kWarpsM_, int kFragsM_>
struct Tile {
  static constexpr Math kMath = M;
  static constexpr bool kSimt = M == Math::kFp32Simt;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarps / kWarpsM_;
  static constexpr int kFragsM = kSimt ? 1 : kFragsM_;
  static constexpr int kFragsN = 4;
  static constexpr int kWarpRows = kSimt ? 8 : 16 * kFragsM_;
  static constexpr int kWarpCols = kSimt ? 256 : 16 * kFragsN;
  static constexpr int BM = kWarpsM * kWarpRows;
  static constexpr int BN = kWarpsN * kWarpCols;
  using T = Operand<M>;
  // 16 bytes of padding per shared-memory row: rows then start 4 banks apart, so the 8 rows
  // of a fragment load (or the transposed stores of the SIMT G tile) spread over the banks.
  static constexpr int kPad = 16 / sizeof(T);
  // G slice: [BM][kBlockK] row-major for WMMA (matrix_a), [kBlockK][BM] for SIMT (so a warp's
  // 8 rows at one feature are 32 contiguous bytes, read as two broadcast float4).
  static constexpr int kGPitch = kSimt ? BM + kPad : kBlockK + kPad;
  static constexpr int kGElems = kSimt ? kBlockK * kGPitch : BM * kGPitch;
  // R slice: [kBlockK][BN] row-major (matrix_b).
  static constexpr int kRPitch = BN + kPad;
  static constexpr int kRElems = kBlockK * kRPitch;
  static constexpr int kStageElems = kGElems + kRElems;
  static constexpr size_t kStagesBytes = 2 * static_cast<size_t>(kStageElems) * sizeof(T);
  // After the two stages: one 16 x 16 float buffer per warp, where the WMMA path stages its
  // accumulator fragments on their way to memory (their lane layout is opaque).
  static constexpr size_t kSmemBytes = kStagesBytes + kWarps * 256 * sizeof(float);

  static_assert(kWarpsM * kWarpsN == kWarps, "warp layout must use every warp");
  static_assert(kFragsM >= 1, "at least one fragment row per warp");
  static_assert(BN % 128 == 0, "a column tile must hold whole 128-column Philox blocks");
  static_assert(!kSimt || (kWarpsM == kWarps && kWarpsN == 1), "SIMT layout is 8 x 1 warps");
  // WMMA pointers must be 32-byte aligned: every tile and stage boundary, every fragment row
  // step (16 rows, or 8 for tf32 k-steps) and every fragment column offset.
  static_assert(kGElems * sizeof(T) % 32 == 0 && kRElems * sizeof(T) % 32 == 0,
                "shared-memory tiles must stay 32-byte aligned");
  static_assert(kGPitch * sizeof(T) * 8 % 32 == 0 && kRPitch * sizeof(T) * 8 % 32 == 0,
                "8- and 16-row steps must stay 32-byte aligned");
  static_assert(kGPitch * sizeof(T) % 16 == 0 && kRPitch * sizeof(T) % 16 == 0,
                "rows must stay 16-byte aligned for vector stores");
};

// BM x BN. The bf16 warps own 64 x 64 (128 accumulator registers per thread, just fitting
// in 255 without spills on sm_90); tf32 warps own 32 x 64, because at 64 x 64 the tf32
// build spilled (its k-steps are half as deep, so twice as many fragments are unrolled).
using SimtFp32 = Tile<Math::kFp32Simt, 8, 1>;   // 64 x 256
using Tf32Large = Tile<Math::kTf32Wmma, 4, 2>;  // 128 x 128
using Tf32Small = Tile<Math::kTf32Wmma, 2, 2>;  // 64 x 256 (B <= 64)
using Bf16Large = Tile<Math::kBf16Wmma, 2, 4>;  // 128 x 256
using Bf16Small = Tile<Math::kBf16Wmma, 1, 4>;  // 64 x 512 (B <= 64)

// ---- input element types -------------------------------------------------------------------
// Inputs are read as raw bits (so that a zero fill is the bit pattern 0 and a load's result
// is not used until it is written to shared memory), then converted to float.
template <typename TIn>
struct Input;
template <>
struct Input<float> {
  using Raw = uint32_t;
  static __device__ __forceinline__ float to_float(Raw r) { return __uint_as_float(r); }
};
template <>
struct Input<__half> {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) {
    return __half2float(__ushort_as_half(r));
  }
};
template <>
struct Input<__nv_bfloat16> {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_float(Raw r) {
    return __bfloat162float(__ushort_as_bfloat16(r));
  }
};

// float -> operand type (round to nearest even for bf16 and tf32).
template <Math M>
__device__ __forceinline__ Operand<M> to_operand(float x);
template <>
__device__ __forceinline__ float to_operand<Math::kFp32Simt>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_operand<Math::kTf32Wmma>(float x) {
#if TRAK_FAST_SM80
  return wmma::__float_to_tf32(x);
#else
  return x;
#endif
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_operand<Math::kBf16Wmma>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename TIn>
struct Params {
  const typename Input<TIn>::Raw* g;  // g[b, i] at g[b * g_stride_b + i * g_stride_f]
  int64_t g_stride_b;
  int64_t g_stride_f;
  int64_t batch;
  int64_t width;
  int64_t k;
  float* acc;       // [batch, k], contiguous
  float* partials;  // [splits, batch, k] when splits > 1, else nullptr
  float scale;
  int64_t kind;
  uint64_t seed;
  uint64_t offset;  // matrix row of g[:, 0]
  int64_t chunk;    // features per split, a multiple of kBlockK
  int64_t row_tiles;
  int64_t col_tiles;
  bool out_vec;  // acc (and partials) rows 16-byte aligned: k % 4 == 0, bases aligned
};

// ---- loading a [BM, kBlockK] slice of g ----------------------------------------------------
// Thread t loads vectors t, t + 256, ... (fast_index::g_vector). With kVec, a vector is one
// 16-byte load kept as raw uint4 bits until the store to shared memory unpacks it (the host
// checked fast_index::vec_loads_ok). One predicate per slice: when the whole [BM, kBlockK]
// slice is inside g and the split (fast_index::g_slice_full, every step but the last of a
// split and the last row tile), the loads are issued back to back without checks, so they all
// stay in flight across the multiply; otherwise each vector is checked, and rows past the batch
// and features past the split read as 0.
template <typename Raw>
__device__ __forceinline__ Raw raw_elem(const uint4& v, int e) {
  // e is a compile-time constant after unrolling: no run-time register indexing.
  if constexpr (sizeof(Raw) == 4) {
    return (e & 2) ? ((e & 1) ? v.w : v.z) : ((e & 1) ? v.y : v.x);
  } else {
    const uint32_t w = (e & 4) ? ((e & 2) ? v.w : v.z) : ((e & 2) ? v.y : v.x);
    return static_cast<Raw>((e & 1) ? (w >> 16) : (w & 0xFFFFu));
  }
}
template <typename Raw>
__device__ __forceinline__ void set_raw_elem(uint4& v, int e, Raw x) {
  if constexpr (sizeof(Raw) == 4) {
    ((e & 2) ? ((e & 1) ? v.w : v.z) : ((e & 1) ? v.y : v.x)) = x;
  } else {
    uint32_t& w = (e & 4) ? ((e & 2) ? v.w : v.z) : ((e & 2) ? v.y : v.x);
    w |= static_cast<uint32_t>(x) << ((e & 1) ? 16 : 0);
  }
}

template <class Cfg, typename TIn, bool kVec>
struct GLoader {
  using Raw = typename Input<TIn>::Raw;
  static constexpr int V = kVec ? 16 / static_cast<int>(sizeof(Raw)) : 1;
  static constexpr int kPerThread = Cfg::BM * kBlockK / (V * kThreads);
  static_assert(Cfg::BM * kBlockK % (V * kThreads) == 0, "slice must split evenly");
  using Reg = std::conditional_t<kVec, uint4, Raw>;
  Reg regs[kPerThread];

  __device__ __forceinline__ void load(const Params<TIn>& p, int64_t row0, int64_t f0,
                                       int64_t f_end) {
    const Raw* __restrict__ g = p.g;
    if constexpr (!kVec) {
      // Strided (scalar) loads, checked. Vector i of thread t is g_vector(t + i * kThreads) =
      // (row v0.m + i * kRowsPerPass, feature v0.kk) with v0 = g_vector(t): one feature per
      // thread and a running element offset, so each load costs a 64-bit add instead of its own
      // 64-bit address arithmetic. (With 16 such addresses, the 128 x 128 tf32 kernels spilled
      // 24 bytes on sm_90, 20 on sm_80, and the 128 x 256 bf16 ones 12 on sm_80: issue 25. An
      // unchecked variant spilled 144 bytes next to the 128 accumulators: issue 10.) The same
      // elements go to the same registers as before: the g slice in shared memory is bit for
      // bit the same.
      constexpr int kRowsPerPass = fast_index::g_rows_per_pass(V);
      const fast_index::GVec v0 = fast_index::g_vector(threadIdx.x, V);
      const int64_t b0 = row0 + v0.m, f = f0 + v0.kk;
      const bool f_ok = f < f_end;
      const int64_t step = kRowsPerPass * p.g_stride_b;
      int64_t off = b0 * p.g_stride_b + f * p.g_stride_f;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        regs[i] = (f_ok && b0 + i * kRowsPerPass < p.batch) ? g[off] : Raw(0);
        off += step;
      }
    } else {
      if (fast_index::g_slice_full(row0, Cfg::BM, p.batch, f0, f_end)) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          const fast_index::GVec v = fast_index::g_vector(threadIdx.x + i * kThreads, V);
          const int64_t b = row0 + v.m, f = f0 + v.kk;
          regs[i] = *reinterpret_cast<const uint4*>(g + b * p.g_stride_b + f);
        }
        return;
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const fast_index::GVec v = fast_index::g_vector(threadIdx.x + i * kThreads, V);
        const int64_t b = row0 + v.m, f = f0 + v.kk;
        if (b < p.batch && f + V <= f_end) {
          regs[i] = *reinterpret_cast<const uint4*>(g + b * p.g_stride_b + f);
        } else {
          regs[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            if (b < p.batch && f + e < f_end) set_raw_elem<Raw>(regs[i], e, g[b * p.g_stride_b + f + e]);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void store(typename Cfg::T* gs) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const fast_index::GVec v = fast_index::g_vector(threadIdx.x + i * kThreads, V);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        Raw r;
        if constexpr (kVec) {
          r = raw_elem<Raw>(regs[i], e);
        } else {
          r = regs[i];
        }
        const auto x = to_operand<Cfg::kMath>(Input<TIn>::to_float(r));
        if (Cfg::kSimt) {
          gs[(v.kk + e) * Cfg::kGPitch + v.m] = x;
        } else {
          gs[v.m * Cfg::kGPitch + v.kk + e] = x;
        }
      }
    }
  }
};

// ---- generating a [kBlockK, BN] slice of R -------------------------------------------------
using fast_index::bf16_sign_pair;
using fast_index::f32_sign;
using fast_index::philox_word;

// Writes the 32 entries +-1 given by the bits of `word` (bit t set: entry t is -1).
// dst is 16-byte aligned.
__device__ __forceinline__ void store_signs(float* dst, uint32_t word) {
#pragma unroll
  for (int t = 0; t < 32; t += 4) {
    uint4 v;
    v.x = f32_sign(word >> t);
    v.y = f32_sign(word >> (t + 1));
    v.z = f32_sign(word >> (t + 2));
    v.w = f32_sign(word >> (t + 3));
    *reinterpret_cast<uint4*>(dst + t) = v;
  }
}
__device__ __forceinline__ void store_signs(__nv_bfloat16* dst, uint32_t word) {
#pragma unroll
  for (int t = 0; t < 32; t += 8) {
    uint4 v;
    v.x = bf16_sign_pair(word >> t);
    v.y = bf16_sign_pair(word >> (t + 2));
    v.z = bf16_sign_pair(word >> (t + 4));
    v.w = bf16_sign_pair(word >> (t + 6));
    *reinterpret_cast<uint4*>(dst + t) = v;
  }
}

// rs[kk][c] = R[offset + f0 + kk, col0 + c] for kk < kBlockK, c < BN (col0 a multiple of BN).
template <class Cfg, typename TIn>
__device__ __forceinline__ void generate_r(typename Cfg::T* rs, const Params<TIn>& p,
                                           int64_t f0, int64_t col0) {
  const uint64_t row_base = p.offset + static_cast<uint64_t>(f0);
  if (p.kind == kGaussian) {
    // One item = one Philox call = columns 4q .. 4q + 3 of one row.
    constexpr int kGroupsPerRow = Cfg::BN / 4;
    const uint64_t block_base = static_cast<uint64_t>(col0) / kGaussianBlockCols;
    for (int item = threadIdx.x; item < kBlockK * kGroupsPerRow; item += kThreads) {
      const int kk = item / kGroupsPerRow;
      const int q = item % kGroupsPerRow;
      float v[4];
      gaussian_block(p.seed, row_base + kk, block_base + q, v);
      typename Cfg::T* dst = rs + kk * Cfg::kRPitch + 4 * q;
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[e] = to_operand<Cfg::kMath>(v[e]);
    }
  } else {
    // One item = one 32-bit word = columns 32w .. 32w + 31 of one row. The four words of a
    // Philox call go to four neighbouring threads, which each recompute the call: cheaper
    // than a second barrier to share it. Column col0 + 32w + t is bit t of word w % 4 of
    // block col0 / 128 + w / 4 (col0 is a multiple of 128).
    constexpr int kWordsPerRow = Cfg::BN / 32;
    const uint64_t block_base = static_cast<uint64_t>(col0) / kRademacherBlockCols;
    for (int item = threadIdx.x; item < kBlockK * kWordsPerRow; item += kThreads) {
      const fast_index::RadWord rw = fast_index::rad_word(item, Cfg::BN);
      const Philox4 bits = rademacher_bits(p.seed, row_base + rw.kk, block_base + rw.w / 4);
      store_signs(rs + rw.kk * Cfg::kRPitch + 32 * rw.w, philox_word(bits, rw.w & 3));
    }
  }
}

// ---- writing the output --------------------------------------------------------------------
// A block flushes its sums one or more times (see kFlushSteps); `first` marks its first
// flush, which writes its partial-sum slot instead of adding to it. Each element belongs to
// one thread alone, so the adds need no atomics and happen in a fixed order.
//
// emit_run writes a run of N consecutive output columns of one row: vals[0..N) at (row, col).
// Fast path (the run inside the output, rows 16-byte aligned): all N/4 float4 loads are issued
// before the first add, then the adds, then the float4 stores. Otherwise element by element,
// with bounds checks.
template <int N, typename TIn>
__device__ __forceinline__ void emit_run(const Params<TIn>& p, int64_t split, int64_t row,
                                         int64_t col, const float (&vals)[N], bool first) {
  static_assert(N % 4 == 0, "runs of whole float4");
  const bool to_partials = p.partials != nullptr;
  float* __restrict__ dst = to_partials ? p.partials + (split * p.batch + row) * p.k + col
                                        : p.acc + row * p.k + col;
  const float mul = to_partials ? 1.0f : p.scale;
  if (p.out_vec && fast_index::out_run_full(row, col, N, p.batch, p.k)) {
    float4 old[N / 4];
    if (to_partials && first) {
#pragma unroll
      for (int q = 0; q < N / 4; ++q) old[q] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
#pragma unroll
      for (int q = 0; q < N / 4; ++q) old[q] = reinterpret_cast<const float4*>(dst)[q];
    }
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      float4 o = old[q];
      o.x = o.x + mul * vals[4 * q + 0];
      o.y = o.y + mul * vals[4 * q + 1];
      o.z = o.z + mul * vals[4 * q + 2];
      o.w = o.w + mul * vals[4 * q + 3];
      reinterpret_cast<float4*>(dst)[q] = o;
    }
    return;
  }
  if (row >= p.batch) return;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (col + e < p.k) {
      dst[e] = (to_partials && first) ? vals[e] : dst[e] + mul * vals[e];
    }
  }
}

// ---- the multiply: tensor cores (WMMA) -----------------------------------------------------
// Tensor cores add into their float32 accumulators with truncation (round toward zero; Fasi,
// Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021),
// a bias of up to 1 ulp per MMA that grows linearly with the number of MMAs. So the fragments
// are flushed into memory with ordinary round-to-nearest adds, and restarted at 0, every
// kFlushSteps steps = kFlushMmas = 512 MMAs per accumulator: 256 steps (8192 features) for
// bf16 (k16 MMAs), 128 steps (4096 features) for tf32 (k8 MMAs). Bias bound: each MMA's
// truncation loses less than 1 ulp = 2^-23 of the accumulator's magnitude, so 512 MMAs lose
// < 512 * 2^-23 = 6.1e-5 of the partial sum (expected ~2e-5: half an ulp per MMA of an
// accumulator that grows like sqrt(steps), 2^-24 * 512 * 2/3), against the error of
// the operand rounding the precision promises, ~1.1e-3 for bf16 (18x the bound) and ~3e-4 for
// tf32 (5x the bound, 10x the mean). The flush is a read-modify-write of the block's tile; at
// 512 MMAs per flush (was 128 bf16 / 256 tf32) it runs 4x (bf16) or 2x (tf32) less often.
template <class Cfg>
struct WmmaMath {
  static constexpr bool kTf32 = Cfg::kMath == Math::kTf32Wmma;
  static constexpr int kStepK = kTf32 ? 8 : 16;
  static constexpr int64_t kFlushMmas = 512;
  static constexpr int64_t kFlushSteps = kFlushMmas * kStepK / kBlockK;
  using Elem = std::conditional_t<kTf32, wmma::precision::tf32, __nv_bfloat16>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kStepK, Elem, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kStepK, Elem, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kStepK, float>;

  FragC c[Cfg::kFragsM][Cfg::kFragsN];
  int warp_m, warp_n;

  __device__ __forceinline__ WmmaMath() {
    const int warp = threadIdx.x / 32;
    warp_m = warp / Cfg::kWarpsN;
    warp_n = warp % Cfg::kWarpsN;
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }

  __device__ __forceinline__ void multiply(const typename Cfg::T* gs,
                                           const typename Cfg::T* rs) {
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kStepK) {
      FragA a[Cfg::kFragsM];
      FragB b[Cfg::kFragsN];
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
        wmma::load_matrix_sync(a[i], gs + (warp_m * Cfg::kWarpRows + 16 * i) * Cfg::kGPitch + kk,
                               Cfg::kGPitch);
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j)
        wmma::load_matrix_sync(b[j], rs + kk * Cfg::kRPitch + warp_n * Cfg::kWarpCols + 16 * j,
                               Cfg::kRPitch);
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kFragsN; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }

  // The fragment's element-to-lane mapping is opaque, so each fragment goes through this
  // warp's 16 x 16 float buffer in shared memory; lane l then takes row l / 2, columns
  // 8 (l % 2) .. + 8 (fast_index::wmma_lane_cells) as two float4 reads from shared memory and
  // one emit_run; then the accumulators restart at 0. Warp-local: no block barrier needed.
  template <typename TIn>
  __device__ __forceinline__ void flush(const Params<TIn>& p, int64_t split, int64_t row0,
                                        int64_t col0, float* staging, bool first) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    float* buf = staging + warp * 256;
    int64_t base_row = row0, base_col = col0;
    // Opaque to the optimiser: otherwise it hoists the loop-invariant output addresses out of
    // the main loop and spills them (seen: ~700 bytes of spills per thread).
    asm volatile("" : "+l"(base_row), "+l"(base_col));
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) {
        wmma::store_matrix_sync(buf, c[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        const fast_index::Cell cell = fast_index::wmma_lane_cells(
            warp, lane, i, j, Cfg::kWarpsN, Cfg::kWarpRows, Cfg::kWarpCols);
        const float4 lo = *reinterpret_cast<const float4*>(buf + 16 * (lane / 2) + 8 * (lane % 2));
        const float4 hi =
            *reinterpret_cast<const float4*>(buf + 16 * (lane / 2) + 8 * (lane % 2) + 4);
        const float vals[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        emit_run<8>(p, split, base_row + cell.r, base_col + cell.c, vals, first);
        __syncwarp();
        wmma::fill_fragment(c[i][j], 0.0f);
      }
    }
  }
};

// ---- the multiply: CUDA cores (fp32) -------------------------------------------------------
template <class Cfg>
struct SimtMath {
  // FMA rounds to nearest: one flush, at the end.
  static constexpr int64_t kFlushSteps = INT64_MAX;
  float c[8][8];
  int warp, lane;

  __device__ __forceinline__ SimtMath() {
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[i][j] = 0.0f;
  }

  __device__ __forceinline__ void multiply(const float* gs, const float* rs) {
#pragma unroll 8
    for (int kk = 0; kk < kBlockK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(gs + kk * Cfg::kGPitch + 8 * warp);
      const float4 a1 = *reinterpret_cast<const float4*>(gs + kk * Cfg::kGPitch + 8 * warp + 4);
      const float4 b0 = *reinterpret_cast<const float4*>(rs + kk * Cfg::kRPitch + 4 * lane);
      const float4 b1 =
          *reinterpret_cast<const float4*>(rs + kk * Cfg::kRPitch + 128 + 4 * lane);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }

  // Row 8 warp + i, columns fast_index::simt_col(lane, j): two runs of 4 per row.
  template <typename TIn>
  __device__ __forceinline__ void flush(const Params<TIn>& p, int64_t split, int64_t row0,
                                        int64_t col0, float*, bool first) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t row = row0 + 8 * warp + i;
      const float lo[4] = {c[i][0], c[i][1], c[i][2], c[i][3]};
      const float hi[4] = {c[i][4], c[i][5], c[i][6], c[i][7]};
      emit_run<4>(p, split, row, col0 + fast_index::simt_col(lane, 0), lo, first);
      emit_run<4>(p, split, row, col0 + fast_index::simt_col(lane, 4), hi, first);
    }
  }
};

// ---- the kernel ----------------------------------------------------------------------------
template <class Cfg, typename TIn, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) project_fast_kernel(const Params<TIn> p) {
#if TRAK_FAST_SM80
  using T = typename Cfg::T;
  using Math_ = std::conditional_t<Cfg::kSimt, SimtMath<Cfg>, WmmaMath<Cfg>>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const stage0 = reinterpret_cast<T*>(smem);
  T* const stage1 = stage0 + Cfg::kStageElems;
  float* const staging = reinterpret_cast<float*>(smem + Cfg::kStagesBytes);

  // Column tiles vary fastest in launch order, so the blocks that read the same slice of g
  // (same split, same row tile) run side by side and share it through L2.
  const fast_index::Block blk = fast_index::block_of(blockIdx.x, p.row_tiles, p.col_tiles,
                                                     Cfg::BM, Cfg::BN, p.chunk, p.width);
  const int64_t col0 = blk.col0, row0 = blk.row0, split = blk.split;
  const int64_t f_begin = blk.f_begin, f_end = blk.f_end, steps = blk.steps;

  GLoader<Cfg, TIn, kVec> loader;
  Math_ math;

  loader.load(p, row0, f_begin, f_end);
  loader.store(stage0);
  generate_r<Cfg>(stage0 + Cfg::kGElems, p, f_begin, col0);
  __syncthreads();

  for (int64_t t = 0; t < steps; ++t) {
    T* const cur = (t & 1) ? stage1 : stage0;
    T* const next = (t & 1) ? stage0 : stage1;
    const bool has_next = t + 1 < steps;
    const int64_t f_next = f_begin + (t + 1) * kBlockK;
    // 16-byte loads stay in flight during the multiply. The strided (scalar) path loads
    // after it instead: its 16 loose elements and their addresses would otherwise stay
    // live across the multiply and push the accumulators out of registers.
    if (kVec && has_next) loader.load(p, row0, f_next, f_end);
    math.multiply(cur, cur + Cfg::kGElems);
    if (has_next) {
      if (!kVec) loader.load(p, row0, f_next, f_end);
      // `next` was last read in step t - 1, which every thread finished before the barrier
      // that ended that step.
      loader.store(next);
      generate_r<Cfg>(next + Cfg::kGElems, p, f_next, col0);
    }
    // After the prefetched registers are spent, so that the flush's temporaries and the
    // accumulators fit in registers together.
    if ((t + 1) % Math_::kFlushSteps == 0 || !has_next) {
      math.flush(p, split, row0, col0, staging, /*first=*/t < Math_::kFlushSteps);
    }
    __syncthreads();
  }

#endif
}

// acc[i] += scale * (partials[0][i] + partials[1][i] + ...), summed in that order.
__global__ void reduce_splits_kernel(float* __restrict__ acc, const float* __restrict__ partials,
                                     int64_t n, int64_t splits, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partials[s * n + i];
    acc[i] = acc[i] + scale * sum;
  }
}

// ---- host side -----------------------------------------------------------------------------
using fast_index::choose_split;
using fast_index::Split;

template <class Cfg, typename TIn>
void launch(const at::Tensor& acc, const at::Tensor& g, uint64_t seed, int64_t kind,
            int64_t offset, double scale) {
  using Raw = typename Input<TIn>::Raw;
  const int64_t batch = g.size(0), width = g.size(1), k = acc.size(1);
  const int64_t row_tiles = ceil_div(batch, Cfg::BM);
  const int64_t col_tiles = ceil_div(k, Cfg::BN);
  const Split split = choose_split(batch, k, width, row_tiles * col_tiles);
  const int64_t blocks = row_tiles * col_tiles * split.splits;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "trak_fast: [", batch, ", ", k,
              "] output needs too many thread blocks (", blocks, ")");

  at::Tensor partials;
  if (split.splits > 1) partials = at::empty({split.splits, batch, k}, acc.options());

  Params<TIn> p;
  p.g = static_cast<const Raw*>(g.data_ptr());
  p.g_stride_b = g.stride(0);
  p.g_stride_f = g.stride(1);
  p.batch = batch;
  p.width = width;
  p.k = k;
  p.acc = acc.data_ptr<float>();
  p.partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  p.scale = static_cast<float>(scale);
  p.kind = kind;
  p.seed = seed;
  p.offset = static_cast<uint64_t>(offset);
  p.chunk = split.chunk;
  p.row_tiles = row_tiles;
  p.col_tiles = col_tiles;

  // 16-byte loads need unit stride along features, 16-byte-aligned rows and base.
  constexpr int V = 16 / sizeof(Raw);
  const bool vec = fast_index::vec_loads_ok(g.stride(1), reinterpret_cast<uintptr_t>(p.g), batch,
                                            g.stride(0), V);
  p.out_vec = k % 4 == 0 && reinterpret_cast<uintptr_t>(p.acc) % 16 == 0 &&
              (p.partials == nullptr || reinterpret_cast<uintptr_t>(p.partials) % 16 == 0);
  auto kernel = vec ? &project_fast_kernel<Cfg, TIn, true> : &project_fast_kernel<Cfg, TIn, false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmemBytes)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(blocks), kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (split.splits > 1) {
    const int64_t n = batch * k;
    const int threads = 256;
    const int64_t grid = std::min<int64_t>(ceil_div(n, threads), 65536);
    reduce_splits_kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(
        p.acc, p.partials, n, split.splits, p.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <class Cfg>
bool launch_for_input(const at::Tensor& acc, const at::Tensor& g, uint64_t seed, int64_t kind,
                      int64_t offset, double scale, int smem_optin) {
  if (static_cast<size_t>(smem_optin) < Cfg::kSmemBytes) return false;
  switch (g.scalar_type()) {
    case at::kFloat:
      launch<Cfg, float>(acc, g, seed, kind, offset, scale);
      return true;
    case at::kHalf:
      launch<Cfg, __half>(acc, g, seed, kind, offset, scale);
      return true;
    case at::kBFloat16:
      launch<Cfg, __nv_bfloat16>(acc, g, seed, kind, offset, scale);
      return true;
    default:
      return false;
  }
}

}  // namespace

bool project_add_cuda_fast(const at::Tensor& acc, const at::Tensor& g, uint64_t seed,
                           int64_t kind, int64_t offset, double scale, int64_t precision) {
  if (acc.scalar_type() != at::kFloat || !acc.is_contiguous() || acc.dim() != 2 ||
      g.dim() != 2) {
    return false;
  }
  const at::ScalarType in = g.scalar_type();
  if (in != at::kFloat && in != at::kHalf && in != at::kBFloat16) return false;
  TORCH_CHECK(acc.is_cuda() && g.is_cuda() && acc.device() == g.device(),
              "trak_fast: acc and g must be on the same CUDA device, got ", acc.device(), " and ",
              g.device());
  TORCH_CHECK(g.size(0) == acc.size(0), "trak_fast: g has ", g.size(0), " rows, acc has ",
              acc.size(0));
  if (g.size(0) == 0 || g.size(1) == 0 || acc.size(1) == 0) return true;  // nothing to add

  const c10::cuda::CUDAGuard guard(acc.device());
  // Attributes rather than at::cuda::getCurrentDeviceProperties(): that header pulls in
  // cuSPARSE's, which a CUDA toolkit without the math libraries lacks.
  int device = 0, major = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (major < 8) return false;  // bf16/tf32 tensor cores and the kernels' build need sm_80
  const bool small_batch = g.size(0) <= 64;
  switch (precision) {
    case kFp32:
      return launch_for_input<SimtFp32>(acc, g, seed, kind, offset, scale, smem_optin);
    case kTf32:
      return small_batch ? launch_for_input<Tf32Small>(acc, g, seed, kind, offset, scale, smem_optin)
                         : launch_for_input<Tf32Large>(acc, g, seed, kind, offset, scale, smem_optin);
    case kBf16:
      return small_batch ? launch_for_input<Bf16Small>(acc, g, seed, kind, offset, scale, smem_optin)
                         : launch_for_input<Bf16Large>(acc, g, seed, kind, offset, scale, smem_optin);
    default:
      return false;
  }
}

}  // namespace trak_fast
