// The fused kernel's tile and index arithmetic (project_fast.cu), in functions that the CUDA
// build and a plain C++ compiler both compile: tests/cuda_index_math.cpp walks them on the CPU
// for many ragged shapes and proves that every output element is written exactly once per
// flush, every gradient element read exactly once per column tile, and nothing out of range.
// No ATen, no CUDA types here.
#pragma once

#include <cstdint>

#include "trak_fast/random_matrix.h"  // TF_HD

namespace trak_fast {
namespace fast_index {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockK = 32;  // features per pipeline step

TF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TF_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
TF_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

struct Split {
  int64_t splits;
  int64_t chunk;  // features per split, a multiple of kBlockK
};

// How many chunks to cut the feature dimension into: a pure function of the shapes (and the
// tile configuration, itself chosen from the shapes), never of the GPU, so every GPU adds the
// same partial sums in the same order.
TF_HD Split choose_split(int64_t batch, int64_t k, int64_t width, int64_t tiles) {
  const int64_t kTargetBlocks = 2048;                  // a few waves on any current GPU
  const int64_t kMinChunk = 4096;                      // >= 128 steps per block
  const int64_t kMaxPartialFloats = int64_t(1) << 26;  // 256 MiB of partial sums
  int64_t splits = ceil_div(kTargetBlocks, tiles);
  splits = min64(splits, ceil_div(width, kMinChunk));
  splits = min64(splits, max64(1, kMaxPartialFloats / (batch * k)));
  splits = max64(splits, 1);
  const int64_t chunk = ceil_div(ceil_div(width, splits), kBlockK) * kBlockK;
  return {ceil_div(width, chunk), chunk};
}

// Which (split, row tile, column tile) block `bid` owns, and its feature range. Column tiles
// vary fastest, so the blocks that read the same slice of g run side by side (shared in L2).
struct Block {
  int64_t row0, col0, split;
  int64_t f_begin, f_end;  // features [f_begin, f_end) of g
  int64_t steps;           // ceil((f_end - f_begin) / kBlockK) >= 1
};
TF_HD Block block_of(int64_t bid, int64_t row_tiles, int64_t col_tiles, int bm, int bn,
                     int64_t chunk, int64_t width) {
  Block b;
  b.col0 = (bid % col_tiles) * bn;
  b.row0 = ((bid / col_tiles) % row_tiles) * bm;
  b.split = bid / col_tiles / row_tiles;
  b.f_begin = b.split * chunk;
  b.f_end = min64(b.f_begin + chunk, width);
  b.steps = ceil_div(b.f_end - b.f_begin, kBlockK);
  return b;
}

// ---- loading a [BM, kBlockK] slice of g ------------------------------------------------------
// Thread t loads vectors t, t + 256, ...; vector v covers row v / (kBlockK / V) of the slice and
// features (v % (kBlockK / V)) * V .. + V.
struct GVec {
  int m;   // row within the slice
  int kk;  // first feature within the slice
};
TF_HD GVec g_vector(int vid, int vec) {
  const int per_row = kBlockK / vec;
  return {vid / per_row, (vid % per_row) * vec};
}
// Rows between a thread's vectors i and i + 1: g_vector(t + i * kThreads, vec) is
// {g_vector(t, vec).m + i * g_rows_per_pass(vec), g_vector(t, vec).kk} (kThreads is a multiple
// of kBlockK / vec), which the strided loader uses to walk one running offset.
constexpr int g_rows_per_pass(int vec) { return kThreads / (kBlockK / vec); }
static_assert(kThreads % kBlockK == 0, "a pass of the loader must cover whole slice rows");
// The whole [bm, kBlockK] slice at (row0, f0) is inside g and the split: no bounds checks.
TF_HD bool g_slice_full(int64_t row0, int bm, int64_t batch, int64_t f0, int64_t f_end) {
  return row0 + bm <= batch && f0 + kBlockK <= f_end;
}
// 16-byte loads of `vec` elements need unit stride along features and every vector start
// 16-byte aligned: base aligned, and (unless there is one row) a row stride that is a multiple
// of vec. Vectors start at multiples of vec from a split start (a multiple of kBlockK).
TF_HD bool vec_loads_ok(int64_t stride_f, uint64_t base_addr, int64_t batch, int64_t stride_b,
                        int vec) {
  return stride_f == 1 && base_addr % 16 == 0 && (batch == 1 || stride_b % vec == 0);
}

// ---- writing the output ---------------------------------------------------------------------
// WMMA: warp w owns rows warp_m * warp_rows + 16 i and columns warp_n * warp_cols + 16 j of the
// block tile (fragment i, j), warp_m = w / warps_n, warp_n = w % warps_n. A fragment goes through
// the warp's 16 x 16 row-major staging buffer; lane l then writes fragment row l / 2, columns
// 8 (l % 2) .. + 8 (two float4 when the fragment is inside the output and aligned).
struct Cell {
  int r;  // row within the block tile
  int c;  // first column within the block tile
};
TF_HD Cell wmma_lane_cells(int warp, int lane, int i, int j, int warps_n, int warp_rows,
                           int warp_cols) {
  const int warp_m = warp / warps_n, warp_n = warp % warps_n;
  return {warp_m * warp_rows + 16 * i + lane / 2, warp_n * warp_cols + 16 * j + 8 * (lane % 2)};
}
// SIMT (fp32): warp w owns rows 8 w .. 8 w + 7; lane l holds columns 4 l .. 4 l + 3 (j < 4) and
// 128 + 4 l .. + 3 (j >= 4) of each: accumulator c[i][j] is row 8 w + i, column simt_col(l, j).
TF_HD int simt_col(int lane, int j) { return j < 4 ? 4 * lane + j : 128 + 4 * lane + (j - 4); }

// A run of `cols` output columns at (row, col) may be written with float4 accesses without
// checks: inside the output, and `out` rows 16-byte aligned (k % 4 == 0, base aligned).
TF_HD bool out_run_full(int64_t row, int64_t col, int cols, int64_t batch, int64_t k) {
  return row < batch && col + cols <= k;
}

// ---- generating a [kBlockK, BN] slice of Rademacher R -----------------------------------------
// Item i (threads t, t + 256, ...) is one 32-bit word of a Philox call: slice row i / (BN / 32),
// columns 32 w .. 32 w + 31 with w = i % (BN / 32); column col0 + 32 w + t (col0 a multiple of
// 128) is bit t of word w % 4 of Philox block col0 / 128 + w / 4. The four words of one call go
// to four neighbouring threads, which each recompute the call.
struct RadWord {
  int kk;  // slice row
  int w;   // word within the slice row
};
TF_HD RadWord rad_word(int item, int bn) { return {item / (bn / 32), item % (bn / 32)}; }
TF_HD uint32_t philox_word(const Philox4& r, int w) {
  // Select without a run-time index into r.w (which could put it in local memory).
  return (w & 2) ? ((w & 1) ? r.w[3] : r.w[2]) : ((w & 1) ? r.w[1] : r.w[0]);
}
// Bit patterns of entries t .. t + 1 (bf16 pair: bit 0 of x -> low half, bit 1 -> high half)
// and of entry t (float): +1 is 0x3F80 / 0x3F800000, -1 adds the sign bit.
TF_HD uint32_t bf16_sign_pair(uint32_t x) {
  return 0x3F803F80u | ((x & 1u) << 15) | ((x & 2u) << 30);
}
TF_HD uint32_t f32_sign(uint32_t x) { return 0x3F800000u | ((x & 1u) << 31); }

}  // namespace fast_index
}  // namespace trak_fast
