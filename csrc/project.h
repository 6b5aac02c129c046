// Declarations shared by the op registration and the backend kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace trak_fast {

// Matches the `precision` argument of the Python API.
enum Precision : int64_t { kFp32 = 0, kTf32 = 1, kBf16 = 2 };

// out[b, j] += scale * sum_i piece[b, i] * R[offset(piece) + i, j] for every piece in
// `grads`, where offset(piece) = feature_offset + widths of the pieces before it.
// `out` is a [B, k] float32 or float64 tensor; the pieces are [B, ...] floating tensors.
void project_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                     int64_t feature_offset, double scale, int64_t precision);
void fill_projection_matrix_cpu(const at::Tensor& out, int64_t seed, int64_t kind,
                                int64_t feature_offset, double scale);

// kind="sparse" (trak_fast/sparse_matrix.h): the same contract with R the sparse matrix
// of `nnz` nonzeros per row for k = out.size(1).
void project_sparse_add_cpu(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t nnz,
                            int64_t feature_offset, double scale);
void fill_sparse_matrix_cpu(const at::Tensor& out, int64_t seed, int64_t nnz, int64_t feature_offset,
                            double scale);

#ifdef TRAK_FAST_WITH_CUDA
void project_add_cuda(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                      int64_t feature_offset, double scale, int64_t precision);
void fill_projection_matrix_cuda(const at::Tensor& out, int64_t seed, int64_t kind,
                                 int64_t feature_offset, double scale);
void project_sparse_add_cuda(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t nnz,
                             int64_t feature_offset, double scale);
void fill_sparse_matrix_cuda(const at::Tensor& out, int64_t seed, int64_t nnz, int64_t feature_offset,
                             double scale);
#endif

// Argument checks shared by every backend; each message names the argument.
void check_project_args(const at::Tensor& out, at::TensorList grads, int64_t seed, int64_t kind,
                        int64_t feature_offset, int64_t precision);
void check_matrix_args(const at::Tensor& out, int64_t seed, int64_t kind, int64_t feature_offset);
void check_sparse_project_args(const at::Tensor& out, at::TensorList grads, int64_t seed,
                               int64_t nnz, int64_t feature_offset);
void check_sparse_matrix_args(const at::Tensor& out, int64_t seed, int64_t nnz,
                              int64_t feature_offset);

}  // namespace trak_fast
