"""Loads the compiled ops and registers what torch needs around them.

The C++ library (trak_fast._C) defines these ops in the ``trak_fast`` namespace:

- ``project(grads, proj_dim, seed, kind, feature_offset, scale, precision) -> Tensor``
- ``project_add_(out, grads, seed, kind, feature_offset, scale, precision)`` (adds into out)
- ``fill_projection_matrix_(out, seed, kind, feature_offset, scale)``
- ``project_sparse``, ``project_sparse_add_``, ``fill_sparse_matrix_``: the same for
  ``kind="sparse"``, with ``nnz`` in place of ``kind`` (and no ``precision``).

This module adds fake (meta) kernels so the ops trace under ``torch.compile``, and an
autograd rule that fails with a clear message: the projection is not differentiable.
"""
from __future__ import annotations

import torch

try:
    from .. import _C  # noqa: F401  (loading the library runs the op registrations)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "trak_fast's compiled extension (trak_fast._C) could not be loaded. Build it with "
        "`pip install --no-build-isolation -e .` in an environment that has torch. "
        f"Original error: {exc}"
    ) from exc

ops = torch.ops.trak_fast

KINDS = {"rademacher": 0, "gaussian": 1, "sparse": 2}  # sparse has ops of its own
SPARSE = KINDS["sparse"]
PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2}


def result_dtype(grads) -> torch.dtype:
    """float64 when any piece is float64, float32 otherwise."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


@torch.library.register_fake("trak_fast::project")
def _project_fake(grads, proj_dim, seed, kind, feature_offset, scale, precision):
    return grads[0].new_empty((grads[0].shape[0], proj_dim), dtype=result_dtype(grads))


@torch.library.register_fake("trak_fast::project_add_")
def _project_add_fake(out, grads, seed, kind, feature_offset, scale, precision):
    return None


@torch.library.register_fake("trak_fast::fill_projection_matrix_")
def _fill_fake(out, seed, kind, feature_offset, scale):
    return None


@torch.library.register_fake("trak_fast::project_sparse")
def _project_sparse_fake(grads, proj_dim, seed, nnz, feature_offset, scale):
    return grads[0].new_empty((grads[0].shape[0], proj_dim), dtype=result_dtype(grads))


@torch.library.register_fake("trak_fast::project_sparse_add_")
def _project_sparse_add_fake(out, grads, seed, nnz, feature_offset, scale):
    return None


@torch.library.register_fake("trak_fast::fill_sparse_matrix_")
def _fill_sparse_fake(out, seed, nnz, feature_offset, scale):
    return None


def _not_differentiable(ctx, grad_output):
    raise RuntimeError(
        "trak_fast.project is not differentiable: the projection of per-example gradients is "
        "a feature map, not part of a model. Call it on detached tensors, or under "
        "torch.no_grad()."
    )


def _setup_context(ctx, inputs, output):
    return None


torch.library.register_autograd("trak_fast::project", _not_differentiable, setup_context=_setup_context)
torch.library.register_autograd("trak_fast::project_sparse", _not_differentiable,
                                setup_context=_setup_context)


def has_cuda_kernels() -> bool:
    """True when this build registered CUDA kernels for the ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("trak_fast::project_add_", "CUDA")
