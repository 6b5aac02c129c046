// Walks the fused CUDA kernel's index arithmetic (csrc/cuda/project_fast_index.h) on the CPU,
// for one shape, over every tile configuration and load width the kernel is built with.
//
//   cuda_index_math BATCH K WIDTH
//
// For each configuration it replays what every thread of every block does, using the same
// functions the kernel calls, and checks:
//   * the split: chunks a multiple of kBlockK, every split non-empty, together exactly [0, width);
//   * the g loads: each step's [BM, kBlockK] shared-memory slice is filled exactly once per slot;
//     every element read is inside g and inside its block's split; every element of g is read
//     exactly once per column tile; 16-byte vectors are 16-byte aligned whenever
//     vec_loads_ok says they may be used;
//   * the flush: the staging buffer is read exactly once per slot; every output element (and
//     every partial-sum slot) is written exactly once per flush, nothing outside [B, k], for
//     both the float4 and the checked path;
//   * the Rademacher R slice: every entry of the [kBlockK, BN] slice written exactly once per
//     step, with the bit pattern of the definition's value (rademacher_entry).
// Prints "ok <configs checked>" and exits 0, or prints the first failure and exits 1.
//
// Built with -DINJECT_FAULT=1, 2 or 3, the walker replays a deliberately wrong kernel (1: an
// off-by-one in the full-slice predicate; 2: a flush lane mapping shifted by one column; 3: R
// signs taken from the wrong word of the Philox call), which the test expects it to reject: the checks
// can fail.
#ifndef INJECT_FAULT
#define INJECT_FAULT 0
#endif
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "project_fast_index.h"

using namespace trak_fast::fast_index;

namespace {

struct Config {
  const char* name;
  bool simt;
  int warps_m;
  int frags_m;
  int operand_bytes;  // 4: float operands (fp32, tf32), 2: bf16
  // derived as in project_fast.cu's Tile
  int warps_n() const { return kWarps / warps_m; }
  int warp_rows() const { return simt ? 8 : 16 * frags_m; }
  int warp_cols() const { return simt ? 256 : 64; }
  int bm() const { return warps_m * warp_rows(); }
  int bn() const { return warps_n() * warp_cols(); }
};

const Config kConfigs[] = {
    {"SimtFp32", true, 8, 1, 4}, {"Tf32Large", false, 4, 2, 4}, {"Tf32Small", false, 2, 2, 4},
    {"Bf16Large", false, 2, 4, 2}, {"Bf16Small", false, 1, 4, 2},
};

[[noreturn]] void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  std::exit(1);
}
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      char buf[512];                                      \
      std::snprintf(buf, sizeof buf, __VA_ARGS__);        \
      fail(std::string(#cond) + ": " + buf);              \
    }                                                     \
  } while (0)

void check_config(const Config& cfg, int64_t batch, int64_t k, int64_t width, int elem_bytes,
                  bool vec) {
  const int bm = cfg.bm(), bn = cfg.bn();
  CHECK(bn % 128 == 0, "%s: BN %d", cfg.name, bn);
  const int V = vec ? 16 / elem_bytes : 1;
  const int per_thread = bm * kBlockK / (V * kThreads);
  CHECK(per_thread * V * kThreads == bm * kBlockK, "%s V=%d: slice does not split", cfg.name, V);
  const int64_t row_tiles = ceil_div(batch, bm), col_tiles = ceil_div(k, bn);
  const Split sp = choose_split(batch, k, width, row_tiles * col_tiles);
  CHECK(sp.chunk % kBlockK == 0 && sp.chunk > 0, "%s: chunk %lld", cfg.name, (long long)sp.chunk);
  CHECK(sp.splits >= 1 && (sp.splits - 1) * sp.chunk < width && sp.splits * sp.chunk >= width,
        "%s: %lld splits of %lld for width %lld", cfg.name, (long long)sp.splits,
        (long long)sp.chunk, (long long)width);
  const int64_t blocks = row_tiles * col_tiles * sp.splits;

  // An aligned base, row stride = width rounded up to V (a layout vec_loads_ok accepts), so
  // that the alignment of each loaded vector can be checked.
  const int64_t stride_b = vec ? ceil_div(width, V) * V : width;
  CHECK(!vec || vec_loads_ok(1, 0, batch, stride_b, V), "vec_loads_ok rejects an aligned layout");

  std::vector<uint16_t> g_reads(static_cast<size_t>(batch * width), 0);
  std::vector<uint8_t> out_writes(static_cast<size_t>(sp.splits * batch * k), 0);
  std::vector<uint8_t> slot(static_cast<size_t>(bm * kBlockK));
  for (int64_t bid = 0; bid < blocks; ++bid) {
    const Block blk = block_of(bid, row_tiles, col_tiles, bm, bn, sp.chunk, width);
    CHECK(blk.row0 < batch && blk.col0 < k && blk.split < sp.splits, "block %lld outside",
          (long long)bid);
    CHECK(blk.f_begin < blk.f_end && blk.steps >= 1, "block %lld empty split", (long long)bid);
    // ---- the loads of every step
    for (int64_t t = 0; t < blk.steps; ++t) {
      const int64_t f0 = blk.f_begin + t * kBlockK;
      const bool full = g_slice_full(blk.row0, INJECT_FAULT == 1 ? bm - 1 : bm, batch, f0, blk.f_end);
      std::fill(slot.begin(), slot.end(), 0);
      for (int tid = 0; tid < kThreads; ++tid) {
        for (int i = 0; i < per_thread; ++i) {
          const GVec v = g_vector(tid + i * kThreads, V);
          CHECK(v.m >= 0 && v.m < bm && v.kk >= 0 && v.kk + V <= kBlockK, "vector outside slice");
          // The strided loader walks vector i as thread tid's first vector plus i passes.
          const GVec v0 = g_vector(tid, V);
          CHECK(v.m == v0.m + i * g_rows_per_pass(V) && v.kk == v0.kk,
                "%s V=%d: thread %d vector %d is not its first plus %d passes", cfg.name, V, tid,
                i, i);
          for (int e = 0; e < V; ++e) slot[v.m * kBlockK + v.kk + e]++;
          const int64_t b = blk.row0 + v.m, f = f0 + v.kk;
          auto read = [&](int64_t bb, int64_t ff) {
            CHECK(bb >= 0 && bb < batch && ff >= blk.f_begin && ff < blk.f_end,
                  "%s: read g[%lld, %lld] outside (split [%lld, %lld))", cfg.name, (long long)bb,
                  (long long)ff, (long long)blk.f_begin, (long long)blk.f_end);
            g_reads[bb * width + ff]++;
          };
          const bool whole = full || (b < batch && f + V <= blk.f_end);
          if (whole) {
            if (vec) {
              const int64_t byte = (b * stride_b + f) * elem_bytes;
              CHECK(byte % 16 == 0, "%s: unaligned vector at g[%lld, %lld]", cfg.name,
                    (long long)b, (long long)f);
            }
            for (int e = 0; e < V; ++e) read(b, f + e);
          } else {
            for (int e = 0; e < V; ++e)
              if (b < batch && f + e < blk.f_end) read(b, f + e);
          }
        }
      }
      for (size_t s = 0; s < slot.size(); ++s)
        CHECK(slot[s] == 1, "%s: slice slot %zu written %d times", cfg.name, s, slot[s]);
    }
    // ---- one flush (every flush writes the same elements)
    const bool out_vec = k % 4 == 0;  // bases from the allocator are aligned
    auto write_run = [&](int64_t row, int64_t col, int n) {
      const bool fast = out_vec && out_run_full(row, col, n, batch, k);
      for (int e = 0; e < n; ++e) {
        if (fast) {
          CHECK(row < batch && col + e < k, "%s: fast run outside", cfg.name);
        } else if (!(row < batch && col + e < k)) {
          continue;
        }
        CHECK(row >= 0 && col + e >= 0, "negative index");
        out_writes[(blk.split * batch + row) * k + col + e]++;
      }
      if (fast) CHECK((row * k + col) % 4 == 0, "%s: unaligned float4 run", cfg.name);
    };
    if (cfg.simt) {
      for (int w = 0; w < kWarps; ++w)
        for (int lane = 0; lane < 32; ++lane) {
          for (int j = 0; j < 8; ++j)
            CHECK(simt_col(lane, j) == simt_col(lane, j < 4 ? 0 : 4) + (j % 4), "run not contiguous");
          for (int i = 0; i < 8; ++i) {
            CHECK(8 * w + i < bm && simt_col(lane, 4) + 4 <= bn, "simt cell outside tile");
            write_run(blk.row0 + 8 * w + i, blk.col0 + simt_col(lane, 0), 4);
            write_run(blk.row0 + 8 * w + i, blk.col0 + simt_col(lane, 4), 4);
          }
        }
    } else {
      for (int w = 0; w < kWarps; ++w)
        for (int i = 0; i < cfg.frags_m; ++i)
          for (int j = 0; j < 4; ++j) {
            int staging[256] = {0};
            for (int lane = 0; lane < 32; ++lane) {
              Cell c = wmma_lane_cells(w, lane, i, j, cfg.warps_n(), cfg.warp_rows(),
                                       cfg.warp_cols());
              if (INJECT_FAULT == 2 && lane == 31) c.c -= 1;
              CHECK(c.r < bm && c.c + 8 <= bn, "wmma cell outside tile");
              for (int e = 0; e < 8; ++e) staging[16 * (lane / 2) + 8 * (lane % 2) + e]++;
              write_run(blk.row0 + c.r, blk.col0 + c.c, 8);
            }
            for (int e = 0; e < 256; ++e) CHECK(staging[e] == 1, "staging slot read twice");
          }
    }
  }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t f = 0; f < width; ++f)
      CHECK(g_reads[b * width + f] == col_tiles, "%s V=%d: g[%lld, %lld] read %d times, not %lld",
            cfg.name, V, (long long)b, (long long)f, g_reads[b * width + f], (long long)col_tiles);
  for (size_t e = 0; e < out_writes.size(); ++e)
    CHECK(out_writes[e] == 1, "%s: output slot %zu written %d times", cfg.name, e, out_writes[e]);
}

// The Rademacher slice of one step as generate_r writes it (rows row_base + kk, columns
// col0 + c), decoded from the bit patterns and compared with the definition.
void check_rademacher_slice(const Config& cfg, uint64_t seed, uint64_t row_base, int64_t col0) {
  const int bn = cfg.bn();
  std::vector<uint8_t> written(static_cast<size_t>(kBlockK * bn), 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int item = tid; item < kBlockK * (bn / 32); item += kThreads) {
      const RadWord rw = rad_word(item, bn);
      CHECK(rw.kk < kBlockK && 32 * rw.w + 32 <= bn, "%s: R word outside the slice", cfg.name);
      const trak_fast::Philox4 bits =
          trak_fast::rademacher_bits(seed, row_base + rw.kk, col0 / 128 + rw.w / 4);
      const uint32_t word = philox_word(bits, (rw.w + (INJECT_FAULT == 3 ? 1 : 0)) & 3);
      for (int t = 0; t < 32; ++t) {
        const int c = 32 * rw.w + t;
        written[rw.kk * bn + c]++;
        // store_signs: bf16 pairs from bf16_sign_pair(word >> 2m), floats from f32_sign(word >> t)
        float value;
        if (cfg.operand_bytes == 4) {
          const uint32_t b = f32_sign(word >> t);
          CHECK(b == 0x3F800000u || b == 0xBF800000u, "not a float +-1");
          value = b == 0x3F800000u ? 1.0f : -1.0f;
        } else {
          const uint32_t pair = bf16_sign_pair(word >> (t & ~1));
          const uint32_t b = (t & 1) ? pair >> 16 : pair & 0xFFFFu;
          CHECK(b == 0x3F80u || b == 0xBF80u, "not a bf16 +-1");
          value = b == 0x3F80u ? 1.0f : -1.0f;
        }
        const float expect = trak_fast::rademacher_entry(seed, row_base + rw.kk, col0 + c);
        CHECK(value == expect, "%s: R[%llu, %lld] is %g, the definition says %g", cfg.name,
              (unsigned long long)(row_base + rw.kk), (long long)(col0 + c), value, expect);
      }
    }
  }
  for (size_t e = 0; e < written.size(); ++e)
    CHECK(written[e] == 1, "%s: R slice entry %zu written %d times", cfg.name, e, written[e]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::printf("usage: %s BATCH K WIDTH\n", argv[0]);
    return 2;
  }
  const int64_t batch = std::atoll(argv[1]), k = std::atoll(argv[2]), width = std::atoll(argv[3]);
  int checked = 0;
  for (const Config& cfg : kConfigs) {
    for (int elem_bytes : {4, 2}) {  // float inputs; half and bfloat16 inputs
      for (bool vec : {false, true}) {
        check_config(cfg, batch, k, width, elem_bytes, vec);
        ++checked;
      }
    }
  }
  // The Rademacher slice of a few steps and column tiles (rows past 2^32 included).
  for (const Config& cfg : kConfigs) {
    for (uint64_t row_base : {uint64_t(0), uint64_t(width), (uint64_t(1) << 32) - 16}) {
      for (int64_t tile = 0; tile < 3; ++tile) {
        check_rademacher_slice(cfg, 0x9E3779B97F4A7C15ull ^ uint64_t(batch * 131 + k), row_base,
                               tile * cfg.bn());
      }
    }
  }
  // vec_loads_ok: what it must refuse.
  CHECK(!vec_loads_ok(2, 0, 4, 100, 4), "strided features accepted");
  CHECK(!vec_loads_ok(1, 4, 4, 100, 4), "misaligned base accepted");
  CHECK(!vec_loads_ok(1, 0, 4, 6003, 4), "odd row stride accepted");
  CHECK(vec_loads_ok(1, 0, 1, 6003, 4), "one row: any row stride");
  std::printf("ok %d\n", checked);
  return 0;
}
