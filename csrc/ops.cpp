// Op schemas, argument checks and the CPU registrations.
//
// The Python wrappers in trak_fast/_ops.py give the user-facing error messages; the
// checks here are the last line of defence for callers that reach torch.ops directly.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "project.h"
#include "trak_fast/random_matrix.h"
#include "trak_fast/sparse_matrix.h"

// `import trak_fast._C` loads this library, which runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace trak_fast {

namespace {
constexpr int64_t kMaxOffset = int64_t(1) << 62;

void check_common(int64_t seed, int64_t kind, int64_t feature_offset) {
  TORCH_CHECK(seed >= 0, "trak_fast: seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(kind == kRademacher || kind == kGaussian,
              "trak_fast: kind must be 0 (rademacher) or 1 (gaussian), got ", kind);
  TORCH_CHECK(feature_offset >= 0 && feature_offset < kMaxOffset,
              "trak_fast: feature_offset must be in [0, 2^62), got ", feature_offset);
}
}  // namespace

void check_project_args(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                        int64_t feature_offset, int64_t precision) {
  check_common(seed, kind, feature_offset);
  TORCH_CHECK(precision == kFp32 || precision == kTf32 || precision == kBf16,
              "trak_fast: precision must be 0 (fp32), 1 (tf32) or 2 (bf16), got ", precision);
  TORCH_CHECK(out.dim() == 2, "trak_fast: out must be 2-D [B, proj_dim], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "trak_fast: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(!grads.empty(), "trak_fast: grads must hold at least one tensor");
  int64_t total = feature_offset;
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK(g.dim() >= 1, "trak_fast: grads[", t, "] must be [B, ...], got a 0-d tensor");
    TORCH_CHECK(g.size(0) == out.size(0), "trak_fast: grads[", t, "] has batch size ", g.size(0),
                ", expected ", out.size(0));
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "trak_fast: grads[", t,
                "] must be a floating tensor, got ", g.scalar_type());
    TORCH_CHECK(g.device() == out.device(), "trak_fast: grads[", t, "] is on ", g.device(),
                " but out is on ", out.device());
    // out is accumulated into while the pieces are read: they must not share memory. (The
    // overlap test answers "too hard" for any strided view, so ask about storage first.)
    TORCH_CHECK(g.numel() == 0 || !out.storage().is_alias_of(g.storage()) ||
                    at::get_overlap_status(out, g) == at::MemOverlapStatus::No,
                "trak_fast: out must not share memory with grads[", t, "]");
    const int64_t width = g.size(0) == 0 ? 0 : g.numel() / g.size(0);
    TORCH_CHECK(width <= kMaxOffset - total, "trak_fast: feature indices overflow 2^62");
    total += width;
  }
}

void check_matrix_args(const at::Tensor& out, int64_t seed, int64_t kind, int64_t feature_offset) {
  check_common(seed, kind, feature_offset);
  TORCH_CHECK(out.dim() == 2, "trak_fast: out must be 2-D [n, proj_dim], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "trak_fast: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "trak_fast: out must be contiguous");
  TORCH_CHECK(out.size(0) <= kMaxOffset - feature_offset,
              "trak_fast: feature indices overflow 2^62");
}

namespace {
void check_nnz(int64_t nnz, int64_t k) {
  TORCH_CHECK(nnz >= 1 && nnz <= kMaxSparseNnz, "trak_fast: nnz must be in [1, ", kMaxSparseNnz,
              "], got ", nnz);
  TORCH_CHECK(nnz <= k, "trak_fast: nnz must be at most proj_dim (", k, "), got ", nnz);
  TORCH_CHECK(k < (int64_t(1) << 31), "trak_fast: proj_dim must be below 2^31, got ", k);
}
}  // namespace

void check_sparse_project_args(const at::Tensor& out, at::TensorList grads, int64_t seed,
                               int64_t nnz, int64_t feature_offset) {
  check_project_args(out, grads, seed, kRademacher, feature_offset, kFp32);
  check_nnz(nnz, out.size(1));
}

void check_sparse_matrix_args(const at::Tensor& out, int64_t seed, int64_t nnz,
                              int64_t feature_offset) {
  check_matrix_args(out, seed, kRademacher, feature_offset);
  check_nnz(nnz, out.size(1));
}

namespace {

at::ScalarType result_dtype(at::TensorList grads) {
  for (const at::Tensor& g : grads) {
    if (g.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// The functional op, defined once for every backend through the dispatcher.
at::Tensor project(at::TensorList grads, int64_t proj_dim, int64_t seed, int64_t kind,
                   int64_t feature_offset, double scale, int64_t precision) {
  TORCH_CHECK(!grads.empty(), "trak_fast: grads must hold at least one tensor");
  TORCH_CHECK(proj_dim > 0, "trak_fast: proj_dim must be positive, got ", proj_dim);
  at::Tensor out = at::zeros({grads[0].size(0), proj_dim},
                             grads[0].options().dtype(result_dtype(grads)));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trak_fast::project_add_", "")
                       .typed<void(const at::Tensor&, at::TensorList, int64_t, int64_t, int64_t,
                                   double, int64_t)>();
  op.call(out, grads, seed, kind, feature_offset, scale, precision);
  return out;
}

at::Tensor project_sparse(at::TensorList grads, int64_t proj_dim, int64_t seed, int64_t nnz,
                          int64_t feature_offset, double scale) {
  TORCH_CHECK(!grads.empty(), "trak_fast: grads must hold at least one tensor");
  TORCH_CHECK(proj_dim > 0, "trak_fast: proj_dim must be positive, got ", proj_dim);
  at::Tensor out = at::zeros({grads[0].size(0), proj_dim},
                             grads[0].options().dtype(result_dtype(grads)));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trak_fast::project_sparse_add_", "")
                       .typed<void(const at::Tensor&, at::TensorList, int64_t, int64_t, int64_t,
                                   double)>();
  op.call(out, grads, seed, nnz, feature_offset, scale);
  return out;
}

}  // namespace

TORCH_LIBRARY(trak_fast, m) {
  m.def(
      "project_add_(Tensor(a!) out, Tensor[] grads, int seed, int kind, int feature_offset, "
      "float scale, int precision) -> ()");
  m.def(
      "project(Tensor[] grads, int proj_dim, int seed, int kind, int feature_offset, "
      "float scale, int precision) -> Tensor");
  m.def(
      "fill_projection_matrix_(Tensor(a!) out, int seed, int kind, int feature_offset, "
      "float scale) -> ()");
  // kind="sparse": nnz nonzeros per row (trak_fast/sparse_matrix.h).
  m.def(
      "project_sparse_add_(Tensor(a!) out, Tensor[] grads, int seed, int nnz, int feature_offset, "
      "float scale) -> ()");
  m.def(
      "project_sparse(Tensor[] grads, int proj_dim, int seed, int nnz, int feature_offset, "
      "float scale) -> Tensor");
  m.def(
      "fill_sparse_matrix_(Tensor(a!) out, int seed, int nnz, int feature_offset, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(trak_fast, CompositeExplicitAutograd, m) {
  m.impl("project", &project);
  m.impl("project_sparse", &project_sparse);
}

TORCH_LIBRARY_IMPL(trak_fast, CPU, m) {
  m.impl("project_add_", &project_add_cpu);
  m.impl("fill_projection_matrix_", &fill_projection_matrix_cpu);
}

}  // namespace trak_fast
