"""The random projection: ``project`` and its oracle ``projection_matrix``.

The matrix. ``P = R / sqrt(proj_dim)``, where ``R[i, j]`` is a pure function of
``(seed, i, j, kind)`` (Philox4x32-10 counter-based hashing; the exact definition is in
``csrc/include/trak_fast/random_matrix.h`` and docs/matrix.md). ``kind="rademacher"`` gives
entries ``+-1/sqrt(k)``, ``kind="gaussian"`` entries ``N(0, 1/k)``; either way
``E ||P^T g||^2 = ||g||^2``. P is never stored: its tiles are generated where they are used.

``kind="sparse"`` (``csrc/include/trak_fast/sparse_matrix.h``) is a sparse
Johnson-Lindenstrauss transform, Kane and Nelson's block construction: ``P = R / sqrt(c)``
with ``c = nnz``, the columns cut into ``c`` groups of ``m_l = floor(k/c)`` or
``ceil(k/c)`` columns, and row ``i``'s ``l``-th nonzero a sign ``s_l(i) = +-1`` in group
``l``, at ``start_l + sigma_{l,b}(i mod m_l)``, where ``sigma_{l,b}`` is a keyed Feistel
permutation of ``[0, m_l)`` for the block ``b = floor(i / m_l)`` of consecutive rows. So
each row has exactly ``c`` nonzeros in distinct columns (``||P^T e_i|| = 1`` exactly) and
each column receives exactly one group-``l`` nonzero from every block.

The JL argument. Write ``y = P^T g``. Then
``||y||^2 = ||g||^2 + (1/c) sum_l sum_{i != i'} g_i g_i' s_l(i) s_l(i') [col_l(i) = col_l(i')]``
(the diagonal terms give ``||g||^2`` exactly, because a row's ``c`` nonzeros are in
distinct columns). The signs are independent and centred, so ``E ||y||^2 = ||g||^2``,
and the terms are uncorrelated, so
``Var ||y||^2 = (2/c^2) sum_l sum_{i != i'} g_i^2 g_i'^2 Pr[col_l(i) = col_l(i')]``.
Two rows of the same block never collide (``sigma`` is a permutation); rows of different
blocks collide with probability ``1/m_l`` (independent keys), so
``Var ||y||^2 <= (2/(c^2)) * c * (1/min m_l) * ||g||^4 ~= 2 ||g||^4 / k``: the variance of a
dense Rademacher projection. Concentration beyond the second moment (Kane and Nelson,
"Sparser Johnson-Lindenstrauss transforms", JACM 2014) needs ``c = O(eps^-1 log(1/delta))``
nonzeros; TRAK-style use (k in the thousands, c of 1-16) is the regime GraSS measures.
tests/test_sparse.py checks the mean and the variance formula above over many seeds.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from . import library as _ops

Grads = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]

MAX_SEED = 2**63
_MAX_OFFSET = 2**62
MAX_NNZ = 64
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: Any, low: int = 0, high: int = MAX_SEED) -> int:
    """``value`` as a Python int in ``[low, high)``; numpy and 0-d integer tensors are accepted.

    Raises ``TypeError`` naming ``name`` for anything that is not an integer (bools and floats
    included), ``ValueError`` when out of range. The one integer check of the package.
    """
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not low <= result < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {result}")
    return result


def check_kind(kind: str) -> int:
    if not isinstance(kind, str) or kind not in _ops.KINDS:
        raise ValueError(f"kind must be one of {sorted(_ops.KINDS)}, got {kind!r}")
    return _ops.KINDS[kind]


def _check_precision(precision: str) -> int:
    if not isinstance(precision, str) or precision not in _ops.PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_ops.PRECISIONS)}, got {precision!r}")
    return _ops.PRECISIONS[precision]


def check_nnz(nnz, kind_id: int, proj_dim: int) -> int:
    """nnz is checked for every kind (an int in [1, 64]), compared with proj_dim for sparse."""
    check_int("nnz", nnz, 1, MAX_NNZ + 1)
    if kind_id == _ops.SPARSE and nnz > proj_dim:
        raise ValueError(f"nnz must be at most proj_dim ({proj_dim}) for kind='sparse', got {nnz}")
    return nnz


def _check_scale(scale, proj_dim: int, nnz: Optional[int] = None) -> float:
    """scale=None means 1/sqrt(proj_dim) for the dense kinds, 1/sqrt(nnz) for sparse."""
    if scale is None:
        return 1.0 / math.sqrt(proj_dim if nnz is None else nnz)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number (or None for 1/sqrt(proj_dim)), got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _as_pieces(grads: Grads) -> list:
    """Validates ``grads`` and returns it as a list of [B, ...] tensors (no copies)."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(
                f"grads must be a 2-D tensor [B, n] (or a sequence of [B, ...] tensors), "
                f"got a tensor of shape {tuple(grads.shape)}"
            )
        pieces = [grads]
    elif isinstance(grads, Mapping):
        pieces = list(grads.values())
    elif isinstance(grads, (list, tuple)):
        pieces = list(grads)
    else:
        raise TypeError(
            f"grads must be a tensor or a sequence of tensors, got {type(grads).__name__}"
        )
    if not pieces:
        raise ValueError("grads must hold at least one tensor, got an empty "
                         + ("dict" if isinstance(grads, Mapping) else "sequence"))
    # Name pieces as the caller knows them: grads['conv.weight'] for a dict, grads[3] otherwise.
    names = [f"grads[{key!r}]" for key in grads] if isinstance(grads, Mapping) else \
        [f"grads[{t}]" for t in range(len(pieces))]
    for name, g in zip(names, pieces):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(g).__name__}")
        if g.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {g.dtype}")
        if g.layout != torch.strided or g.is_nested:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {g.layout}"
                            f"{' (nested)' if g.is_nested else ''}")
        if g.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
        if g.shape[0] != pieces[0].shape[0]:
            raise ValueError(
                f"{name} has batch size {g.shape[0]}, expected {pieces[0].shape[0]} "
                f"(the batch size of {names[0]})"
            )
        if g.device != pieces[0].device:
            raise ValueError(f"{name} is on {g.device}, expected {pieces[0].device} (the device of {names[0]})")
    return pieces


def project(
    grads: Grads,
    proj_dim: int,
    *,
    seed: int = 0,
    kind: str = "rademacher",
    feature_offset: int = 0,
    out: Optional[torch.Tensor] = None,
    precision: str = "fp32",
    scale: Optional[float] = None,
    nnz: int = 4,
) -> torch.Tensor:
    r"""Projects per-example feature rows onto ``proj_dim`` random directions.

    ``out[b, j] = sum_i grads[b, i] * P[feature_offset + i, j]`` with
    ``P = R / sqrt(proj_dim)`` generated on the fly from ``seed`` (never stored).

    Args:
        grads: a ``[B, n]`` tensor, or a sequence (or dict) of ``[B, ...]`` tensors, e.g.
            the per-parameter gradients that ``torch.func`` returns. A sequence is one
            feature row per example: each piece's per-example slice flattened, the pieces
            concatenated in order, without ever copying them into one ``[B, n]`` buffer.
            float16, bfloat16, float32 or float64; any strides; CPU or CUDA.
        proj_dim: ``k``, the number of output features (any positive int).
        seed: selects the matrix; any int in ``[0, 2**63)``.
        kind: ``"rademacher"`` (entries ``+-1/sqrt(k)``), ``"gaussian"`` (``N(0, 1/k)``) or
            ``"sparse"`` (``nnz`` entries ``+-1/sqrt(nnz)`` per row; see the module docstring).
        feature_offset: index of the first row of P used, so that
            ``project(a, k) + project(b, k, feature_offset=a_width) == project([a, b], k)``.
        out: optional ``[B, k]`` tensor to **add** the projection into (and return).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"``: the arithmetic of the CUDA kernel
            (see docs/guide.md for each one's error). The CPU always computes in fp32 (fp64
            for fp64 input). ``kind="sparse"`` ignores it: its sums are float32 (float64
            for float64 input) on either device.
        scale: multiplies the result instead of ``1/sqrt(k)`` (``1/sqrt(nnz)`` for sparse);
            ``scale=1`` gives the unscaled matrix R (the convention of MadryLab's trak).
        nnz: nonzeros per row for ``kind="sparse"``, an int in ``[1, min(64, k)]``; the
            dense kinds check its type and range only.

    Returns:
        ``[B, k]``, float32 (float64 when any input is float64), or ``out``.

    The op is not differentiable: backpropagating through it raises an error.
    """
    pieces = _as_pieces(grads)
    proj_dim = check_int("proj_dim", proj_dim, 1, 2**31)
    seed = check_int("seed", seed, 0, MAX_SEED)
    feature_offset = check_int("feature_offset", feature_offset, 0, _MAX_OFFSET)
    kind_id = check_kind(kind)
    precision_id = _check_precision(precision)
    nnz = check_nnz(nnz, kind_id, proj_dim)
    sparse = kind_id == _ops.SPARSE
    scale = _check_scale(scale, proj_dim, nnz if sparse else None)
    batch = pieces[0].shape[0]
    width = sum(g.numel() // batch for g in pieces) if batch > 0 else 0
    if feature_offset + width > _MAX_OFFSET:
        raise ValueError(f"feature_offset + the number of features must be at most 2^62, got "
                         f"{feature_offset} + {width}")
    needs_grad = torch.is_grad_enabled() and any(g.requires_grad for g in pieces)

    if out is None:
        if sparse:
            return _ops.ops.project_sparse(pieces, proj_dim, seed, nnz, feature_offset, scale)
        return _ops.ops.project(pieces, proj_dim, seed, kind_id, feature_offset, scale, precision_id)

    if not isinstance(out, torch.Tensor) or out.layout != torch.strided or out.is_nested:
        raise TypeError(f"out must be a dense tensor, got {type(out).__name__}"
                        f"{'' if not isinstance(out, torch.Tensor) else f' with layout {out.layout}'}")
    expected_dtype = _ops.result_dtype(pieces)
    if tuple(out.shape) != (batch, proj_dim):
        raise ValueError(f"out must have shape ({batch}, {proj_dim}), got {tuple(out.shape)}")
    if out.dtype != expected_dtype:
        raise TypeError(f"out must have dtype {expected_dtype} for these grads, got {out.dtype}")
    if out.device != pieces[0].device:
        raise ValueError(f"out is on {out.device}, expected {pieces[0].device} (the device of grads)")
    if needs_grad:
        # Keep autograd's view of the computation (and its clear error on backward).
        if sparse:
            return out.add_(_ops.ops.project_sparse(pieces, proj_dim, seed, nnz, feature_offset, scale))
        return out.add_(_ops.ops.project(pieces, proj_dim, seed, kind_id, feature_offset, scale,
                                         precision_id))
    if sparse:
        _ops.ops.project_sparse_add_(out, pieces, seed, nnz, feature_offset, scale)
    else:
        _ops.ops.project_add_(out, pieces, seed, kind_id, feature_offset, scale, precision_id)
    return out


def projection_matrix(
    n: int,
    proj_dim: int,
    *,
    seed: int = 0,
    kind: str = "rademacher",
    feature_offset: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    scale: Optional[float] = None,
    nnz: int = 4,
) -> torch.Tensor:
    """Rows ``feature_offset .. feature_offset + n - 1`` of P, materialized: ``[n, proj_dim]``.

    The oracle for every fast path (``project(g, k) == g @ projection_matrix(n, k)`` up to
    rounding) and a debugging tool. Entries are defined in float32; for ``dtype=float64``
    the float32 entry is scaled in float64. ``scale`` and ``nnz`` as in :func:`project`.
    """
    n = check_int("n", n, 0, _MAX_OFFSET)
    proj_dim = check_int("proj_dim", proj_dim, 1, 2**31)
    seed = check_int("seed", seed, 0, MAX_SEED)
    feature_offset = check_int("feature_offset", feature_offset, 0, _MAX_OFFSET - n)
    kind_id = check_kind(kind)
    nnz = check_nnz(nnz, kind_id, proj_dim)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    out = torch.empty((n, proj_dim), device=device, dtype=dtype)
    if kind_id == _ops.SPARSE:
        _ops.ops.fill_sparse_matrix_(out, seed, nnz, feature_offset, _check_scale(scale, proj_dim, nnz))
    else:
        _ops.ops.fill_projection_matrix_(out, seed, kind_id, feature_offset, _check_scale(scale, proj_dim))
    return out


def model_seed(seed: int, model_id: int) -> int:
    """The matrix seed of checkpoint ``model_id`` in an ensemble seeded with ``seed``.

    ``SplitMix64(seed * 0x9E3779B97F4A7C15 + model_id mod 2^64)`` with the top bit
    cleared, so it lies in ``[0, 2^63)``. Part of the on-disk format: stores record
    ``seed`` and each ``model_id``, and this function turns them into matrices.
    """
    seed = check_int("seed", seed, 0, MAX_SEED)
    model_id = check_int("model_id", model_id, 0, MAX_SEED)
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + model_id) & mask
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z & ((1 << 63) - 1)
