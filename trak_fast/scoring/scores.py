"""Scores: ``S_m = Phi_m (K_m + lambda_m I)^-1 Phi_m(targets)^T`` and the ensemble over checkpoints.

Shapes: ``Phi_m [n, k]`` train features, ``T_m [t, k]`` target features, ``Q_m [n]``.

``ensemble="mean"`` (the paper's estimator)::

    tau = mean_m(S_m) * mean_m(Q_m)[:, None]                       # [n, t]

with ``lambda_m = lambda_rel * tr(K_m) / n`` by default (see :mod:`trak_fast.kernel`).

``ensemble="trak"`` reproduces MadryLab trak 0.3.2 (``BasicScoreComputer``): its features are
``R^T g / sqrt(p)`` (unscaled projection, divided by the square root of the number of
differentiated parameters ``p``), i.e. ours times ``a = sqrt(k / p)`` (``a = 1 / sqrt(p)`` for
raw gradients); ``lambda`` is absolute and added to ``a^2 K``; each checkpoint's inverse is
divided by the mean absolute value of its entries::

    S_m = a^2 Phi_m M_m T_m^T / mean|M_m|,   M_m = (a^2 K_m + lambda I)^-1

and then the same ``mean_m(S_m) * mean_m(Q_m)``.

Computation: ``W = a^2 M T^T`` (``[k, t]``, float64 solve) once per checkpoint and block of
targets, then ``S[rows] = Phi[rows] @ W`` one block of train rows at a time in the features'
precision (float32; float64 for float64 features). Only a ``block_rows x block_targets`` tile of
``S`` and one block of ``Phi`` live on the compute device at a time, so ``n = 10^6`` train rows
and ``10^4`` targets never need the whole score matrix there.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..settings import ScoreSettings
from .kernel import DEFAULT_BLOCK_ROWS, ArrayLike, Kernel, RegularizedInverse, resolve_lambda, rows

#: Targets scored at a time (columns of a score tile).
DEFAULT_BLOCK_TARGETS = 4096


def trak_feature_scale(proj_dim: Optional[int], num_grad_params: int) -> float:
    """``a`` such that ``a * phi`` are MadryLab trak's features (see the module docstring)."""
    return math.sqrt(proj_dim if proj_dim is not None else 1) / math.sqrt(num_grad_params)


def model_scores(phi: ArrayLike, targets: torch.Tensor, kernel: Kernel, *, lambda_reg: float,
                 relative_lambda: bool, feature_scale: float = 1.0,
                 normalize_inverse: bool = False,
                 out: Optional[Union[torch.Tensor, np.ndarray]] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS, block_targets: int = DEFAULT_BLOCK_TARGETS,
                 progress: bool = False) -> Union[torch.Tensor, np.ndarray]:
    """One checkpoint's ``S = a^2 Phi (a^2 K + lambda I)^-1 T^T`` [n, t], optionally ``/ mean|M|``.

    Args:
        phi: train features ``[n, k]`` (tensor or numpy memmap); ``kernel`` its kernel.
        targets: target features ``[t, k]``.
        lambda_reg, relative_lambda: the damping, see :func:`trak_fast.kernel.resolve_lambda`;
            a relative lambda is taken relative to ``tr(a^2 K) / n``.
        feature_scale: ``a`` (1 for the paper's estimator).
        normalize_inverse: divide by the mean absolute entry of ``M`` (trak's normalization).
        out: if given, ``S`` is **added** into it (CPU tensor or numpy array ``[n, t]``).
    Returns:
        ``out``, or a new CPU tensor ``[n, t]``.
    """
    n, k = phi.shape
    if targets.dim() != 2 or targets.shape[1] != k:
        raise ValueError(f"targets must have shape [t, {k}] to match phi [{n}, {k}], "
                         f"got {tuple(targets.shape)}")
    if kernel.n != n:
        raise ValueError(f"the kernel was computed from {kernel.n} train rows, phi has {n}")
    device = torch.device(device) if device is not None else (
        phi.device if isinstance(phi, torch.Tensor) else torch.device("cpu"))
    dtype = torch.float64 if phi.dtype in (torch.float64, np.float64) else torch.float32
    t = targets.shape[0]
    if out is None:
        out = torch.zeros(n, t, dtype=dtype)
    scale2 = feature_scale ** 2
    matrix = kernel.matrix.to(device) * scale2
    lam = resolve_lambda(scale2 * kernel.trace, n, lambda_reg, relative_lambda)
    inverse = RegularizedInverse(matrix, lam)
    del matrix
    targets = targets.to(device)

    if kernel.form == "primal":
        weights = inverse.solve(targets.T) * scale2                      # [k, t], float64
        if normalize_inverse:
            weights /= inverse.matrix().abs().mean()
        weights = weights.to(dtype)
        blocks = range(0, n, block_rows)
        for start in tqdm(blocks, desc="scoring", unit="block", disable=not progress, leave=False):
            stop = min(n, start + block_rows)
            block = rows(phi, start, stop, device, dtype)
            for t0 in range(0, t, block_targets):
                t1 = min(t, t0 + block_targets)
                _add(out, start, stop, t0, t1, block @ weights[:, t0:t1])
        return out

    if normalize_inverse:
        raise ValueError("ensemble='trak' needs the primal kernel Phi^T Phi [k, k]; this one is "
                         "the dual Gram matrix (k > n). Recompute it with form='primal'.")
    if kernel.weights is not None:
        return _weighted_dual_scores(phi, targets, kernel, lam, scale2, out, device, block_rows,
                                     block_targets)
    # Dual: S = (G + lambda I)^-1 (a^2 Phi T^T), solved over all n rows per block of targets.
    for t0 in range(0, t, block_targets):
        t1 = min(t, t0 + block_targets)
        cross = torch.empty(n, t1 - t0, dtype=torch.float64, device=device)
        tb = targets[t0:t1].to(torch.float64)
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            cross[start:stop] = rows(phi, start, stop, device, torch.float64) @ tb.T
        _add(out, 0, n, t0, t1, inverse.solve(cross * scale2))
    return out


def _weighted_dual_scores(phi, targets, kernel: Kernel, lam: float, scale2: float, out, device,
                          block_rows: int, block_targets: int):
    """``Phi (Phi^T D^2 Phi + lam I)^-1 T^T`` from the Gram matrix ``G = Phi Phi^T``, ``D^2 = W``.

    By the Woodbury identity, with ``C = Phi T^T``::

        S = (C - G D (D G D + lam I)^-1 D C) / lam

    which needs only ``n x n`` matrices and never divides by a weight (some ``Q_i`` are ~0).
    Requires ``lam > 0``.
    """
    if lam <= 0:
        raise ValueError("a weighted kernel in the dual form (k > n) needs lambda > 0")
    n = kernel.n
    gram = kernel.matrix.to(device) * scale2
    d = kernel.weights.to(device=device, dtype=torch.float64).sqrt()
    inverse = RegularizedInverse(d[:, None] * gram * d[None, :], lam)
    for t0 in range(0, targets.shape[0], block_targets):
        t1 = min(targets.shape[0], t0 + block_targets)
        cross = torch.empty(n, t1 - t0, dtype=torch.float64, device=device)
        tb = targets[t0:t1].to(device=device, dtype=torch.float64)
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            cross[start:stop] = rows(phi, start, stop, device, torch.float64) @ tb.T
        cross *= scale2
        _add(out, 0, n, t0, t1, (cross - gram @ (d[:, None] * inverse.solve(d[:, None] * cross))) / lam)
    return out


def block_scores(phi: ArrayLike, targets: torch.Tensor, kernels, *, out, **kwargs):
    """``S = sum_l Phi_l (K_l + lambda_l I)^-1 T_l^T`` over ``kernels = [(block, K_l)]``
    (:func:`trak_fast.kernel.compute_kernels`), each block damped relative to its own trace.

    With one block covering every column this is :func:`model_scores`. Each block's term is
    invariant to rescaling that block's features, so every layer counts by how well its own
    geometry predicts, not by the size of its gradients. Accumulates into ``out``.
    """
    for block, kernel in kernels:
        model_scores(phi[:, block.start:block.stop], targets[:, block.start:block.stop], kernel,
                     out=out, **kwargs)
    return out


def _add(out: Union[torch.Tensor, np.ndarray], r0: int, r1: int, c0: int, c1: int,
         tile: torch.Tensor) -> None:
    tile = tile.detach().cpu()
    if isinstance(out, np.ndarray):
        out[r0:r1, c0:c1] += tile.numpy().astype(out.dtype, copy=False)
    else:
        out[r0:r1, c0:c1] += tile.to(out.dtype)


def finish_ensemble(score_sum: Union[torch.Tensor, np.ndarray], out_to_loss_sum: torch.Tensor,
                    num_models: int, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
    """In place: ``score_sum / M * (out_to_loss_sum / M)[:, None]`` = ``mean(S) * mean(Q)``."""
    q = (out_to_loss_sum.to(torch.float64) / num_models).cpu()
    n = score_sum.shape[0]
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        factor = (q[start:stop] / num_models)[:, None]
        if isinstance(score_sum, np.ndarray):
            score_sum[start:stop] *= factor.numpy().astype(score_sum.dtype)
        else:
            score_sum[start:stop] *= factor.to(score_sum.dtype)


def row_norms(x: ArrayLike, columns: Optional[slice] = None,
              block_rows: int = DEFAULT_BLOCK_ROWS) -> torch.Tensor:
    """``||x_i||`` of every row (of ``x[:, columns]``), float64, read ``block_rows`` at a time
    (``x`` may be a memmap)."""
    columns = columns or slice(None)
    parts = []
    for start in range(0, x.shape[0], block_rows):
        block = x[start:start + block_rows, columns]
        block = block if isinstance(block, torch.Tensor) else \
            torch.from_numpy(np.array(block, dtype=np.float64))       # a copy of a memmap block
        parts.append(block.double().norm(dim=1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def normalize_scores(scores: torch.Tensor, how: str, train: ArrayLike, targets: ArrayLike,
                     columns: Optional[slice] = None) -> torch.Tensor:
    """``scores [n, t]`` divided in place by ``||train_i||`` (``how`` in ``"train"``,
    ``"both"``) and ``||targets_j||`` (``"targets"``, ``"both"``), norms over ``columns`` of
    the rows; a zero norm leaves its row or column at zero."""
    if how in ("train", "both"):
        norms = row_norms(train, columns)
        scores /= torch.where(norms > 0, norms, 1.0).to(scores.dtype)[:, None]
    if how in ("targets", "both"):
        norms = row_norms(targets, columns)
        scores /= torch.where(norms > 0, norms, 1.0).to(scores.dtype)[None, :]
    return scores


def add_checkpoint_scores(phi: ArrayLike, targets: torch.Tensor, kernels, scoring: ScoreSettings, *,
                          out: Union[torch.Tensor, np.ndarray], proj_dim: Optional[int],
                          num_grad_params: int, device=None, progress: bool = False) -> None:
    """``out += S_m``: one checkpoint's scores, the step :func:`~trak_fast.attribute` and
    :meth:`~trak_fast.TRAK.score` share. ``kernels`` as from
    :func:`~trak_fast.scoring.kernel.compute_kernels`; ``proj_dim`` and ``num_grad_params`` give
    trak's feature scale for ``ensemble="trak"`` (see the module docstring); ``S_m``
    normalized by :func:`normalize_scores` as ``scoring.normalize`` says."""
    trak = scoring.ensemble == "trak"
    part = out
    if scoring.normalize != "none":
        part = torch.zeros(tuple(out.shape), dtype=torch.float64)
    block_scores(phi, targets, kernels, lambda_reg=scoring.lambda_reg,
                 relative_lambda=scoring.relative_lambda,
                 feature_scale=trak_feature_scale(proj_dim, num_grad_params) if trak else 1.0,
                 normalize_inverse=trak, out=part, device=device, progress=progress)
    if part is not out:
        normalize_scores(part, scoring.normalize, phi, targets)
        if isinstance(out, torch.Tensor):
            out += part.to(out.dtype)
        else:
            out += part.numpy().astype(out.dtype)
