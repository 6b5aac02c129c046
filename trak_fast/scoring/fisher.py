"""Scores with the Fisher curvature (``ScoreSettings(curvature="fisher")``), per layer.

With ``G [n, k]`` the train examples' log-likelihood gradients (``-grad loss_i``, projected),
``S [n_f, k]`` the gradients of labels sampled from the model (projected the same way, see
:mod:`trak_fast.features.tasks.likelihood`; ``n_f = C n`` rows, one per chunk of positions of
each example, when the task's ``fisher_chunks = C``) and ``T [t, k]`` the targets' output
gradients, for each layer ``l`` of the feature layout (its columns)::

    F_l      = S_l^T S_l / n                          # the projected true Fisher of layer l
    lambda_l = c * tr(F_l) / min(k_l, n_f)            # c times F_l's mean nonzero eigenvalue
    scores   = sum_l G_l (F_l + lambda_l I)^-1 T_l^T  # [n, t]

the influence-function estimate of how much up-weighting train example ``i`` raises target
``z``'s output, with block-diagonal (per layer) curvature: EK-FAC's structure, in the projected
space. ``F_l`` has rank at most ``min(k_l, n_f)``, so the damping is relative to the mean of its
(at most that many) nonzero eigenvalues: one ``c`` serves projected layers (``k_l < n_f``, where
this is the plain mean eigenvalue) and raw gradients (``proj_dim=None``, ``k_l >> n_f``)
alike. Solved in float64 by Cholesky of ``F_l + lambda_l I`` (``[k_l, k_l]``) when
``k_l <= n_f``, else through the ``[n_f, n_f]`` Gram matrix (Woodbury):
``(S^T S / n + lambda I)^-1 = (I - S^T (n lambda I + S S^T)^-1 S) / lambda``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..features.layout import FeatureBlock
from .scores import normalize_scores

ArrayLike = Union[torch.Tensor, np.ndarray]


def symmetric_gram(pieces: Sequence[torch.Tensor], blocks: int = 8) -> torch.Tensor:
    """``S^T S`` for ``S`` the pieces ``[rows_j, k]`` stacked (never concatenated), computing
    only the blocks on and below the diagonal (``(b + 1) / 2b`` of the full product's work for
    ``b`` column blocks: BLAS's syrk, which torch does not expose) and mirroring them."""
    k = pieces[0].shape[1]
    step = max(1, -(-k // blocks))
    lower = torch.zeros(k, k, dtype=pieces[0].dtype, device=pieces[0].device)
    for i in range(0, k, step):
        for s in pieces:                        # column block i, rows i and down
            lower[i:, i:i + step].addmm_(s[:, i:].T, s[:, i:i + step])
    lower.tril_()
    return lower.add_(lower.tril(-1).T)


class FisherSolve:
    """``(F + lambda I)^-1`` of ``F = S^T S / n``, ``lambda = c tr(F) / min(k, n_f)``, float64
    (``S [n_f, k]``; ``n`` the number of examples, ``n_f`` by default: ``n_f = C n`` rows
    when each example gives ``C`` chunk rows)."""

    def __init__(self, s: Union[torch.Tensor, Sequence[torch.Tensor]], c: float,
                 n: Optional[int] = None):
        # The Gram matrix (S^T S, or S S^T for Woodbury) in the rows' own precision (float32
        # features: a float32 GEMM, half the time; its rounding is far below the damping),
        # everything after it in float64.
        # s may be given as pieces [rows_j, k] (the chunks' rows), stacked only if needed.
        pieces = [s] if isinstance(s, torch.Tensor) else list(s)
        n_f, k = sum(p.shape[0] for p in pieces), pieces[0].shape[1]
        n = n_f if n is None else n
        self.n_f, self.k = n, k          # the Gram form below divides by n, as F does
        self.rows = n_f
        if k <= n_f:                                 # F's Gram S^T S, [k, k]
            gram = symmetric_gram(pieces).double()
        else:                                        # Woodbury: S S^T, [n_f, n_f]
            s = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            gram = symmetric_gram([s.T]).double()
        self.trace = float(gram.diagonal().sum()) / n       # tr(S^T S) = tr(S S^T)
        self.lam = c * self.trace / min(k, n_f)
        if self.lam <= 0:
            raise ValueError("curvature='fisher' needs lambda_reg > 0 (relative to the mean "
                             "eigenvalue of each layer's Fisher)")
        self.s = None
        if k <= n_f:                                 # F + lambda I, in place
            gram.div_(n).diagonal().add_(self.lam)
        else:                                        # S S^T + n lambda I, in place
            gram.diagonal().add_(n * self.lam)
            self.s = s.double()
        self.chol = torch.linalg.cholesky(gram)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``(F + lambda I)^-1 v`` for ``v [k, r]``."""
        v = v.double()
        if self.k <= self.rows:
            return torch.cholesky_solve(v, self.chol)
        return (v - self.s.T @ torch.cholesky_solve(self.s @ v, self.chol)) / self.lam


def fisher_scores(train: ArrayLike, sampled: Optional[ArrayLike], targets: ArrayLike,
                  blocks: Sequence[FeatureBlock], c: float,
                  device: Optional[Union[str, torch.device]] = None,
                  out: Optional[torch.Tensor] = None, sampled_offset: int = 0,
                  chunks: int = 1, normalize: str = "none") -> torch.Tensor:
    """``out += sum_l G_l (F_l + lambda_l I)^-1 T_l^T`` (see the module docstring); ``out``
    ``[n, t]`` float64 (created when ``None``). A layer whose sampled gradients are all zero
    (its parameters do not affect the output) contributes nothing. ``sampled [n, C k]``:
    ``C = chunks`` rows of the Fisher per example side by side (``F_l`` from all ``C n`` of
    them, divided by ``n``); ``None``: they are ``train[:, sampled_offset:]`` (a store's
    ``[G | S]`` rows, read a layer at a time). ``normalize`` as in
    :func:`trak_fast.scoring.scores.normalize_scores` (norms of ``G``'s and ``T``'s ``k`` columns)."""
    def block(x, start, stop, dtype=torch.float64):
        part = x[:, start:stop]
        if not isinstance(part, torch.Tensor):
            part = torch.from_numpy(np.array(part))
        return part.to(device=device, dtype=dtype if part.dtype != torch.float64 else part.dtype)
    if sampled is None:
        sampled, shift = train, sampled_offset
    else:
        shift = 0
    t = targets if isinstance(targets, torch.Tensor) else torch.from_numpy(np.asarray(targets))
    n_fisher, k = sampled.shape[0], t.shape[1]      # examples the Fisher comes from
    if out is None:
        out = torch.zeros(train.shape[0], t.shape[0], dtype=torch.float64)
    total, out = out, (out if normalize == "none" else torch.zeros_like(out))
    for b in blocks:
        s_l = [block(sampled, shift + j * k + b.start, shift + j * k + b.stop, torch.float32)
               for j in range(chunks)]                                      # C x [n, k_l]
        if not any(bool((p != 0).any()) for p in s_l):
            continue
        solver = FisherSolve(s_l, c, n=n_fisher)
        w = solver.solve(block(t, b.start, b.stop).T)                          # [k_l, t]
        out += (block(train, b.start, b.stop) @ w).cpu()
    if out is not total:
        total += normalize_scores(out, normalize, train, t, columns=slice(0, k))
    return total
