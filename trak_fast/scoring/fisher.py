"""Scores with the Fisher curvature (``ScoreSettings(curvature="fisher")``), per layer.

With ``G [n, k]`` the train examples' log-likelihood gradients (``-grad loss_i``, projected),
``S [n_f, k]`` the gradients of labels sampled from the model (projected the same way, see
:mod:`trak_fast.features.tasks.likelihood`) and ``T [t, k]`` the targets' output gradients, for
each layer ``l`` of the feature layout (its columns)::

    F_l      = S_l^T S_l / n_f                        # the projected true Fisher of layer l
    lambda_l = c * tr(F_l) / min(k_l, n_f)            # c times F_l's mean nonzero eigenvalue
    scores   = sum_l G_l (F_l + lambda_l I)^-1 T_l^T  # [n, t]

the influence-function estimate of how much up-weighting train example ``i`` raises target
``z``'s output, with block-diagonal (per layer) curvature: EK-FAC's structure, in the projected
space. ``F_l`` has rank at most ``min(k_l, n_f)``, so the damping is relative to the mean of its
(at most that many) nonzero eigenvalues: one ``c`` serves projected layers (``k_l < n_f``, where
this is the plain mean eigenvalue) and raw gradients (``proj_dim=None``, ``k_l >> n_f``) alike. Solved in float64 by Cholesky of ``F_l + lambda_l I`` (``[k_l, k_l]``) when ``k_l <= n_f``,
else through the ``[n_f, n_f]`` Gram matrix (Woodbury):
``(S^T S / n + lambda I)^-1 = (I - S^T (n lambda I + S S^T)^-1 S) / lambda``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..features.layout import FeatureBlock

ArrayLike = Union[torch.Tensor, np.ndarray]


class FisherSolve:
    """``(F + lambda I)^-1`` of ``F = S^T S / n_f``, ``lambda = c tr(F) / min(k, n_f)``, float64."""

    def __init__(self, s: torch.Tensor, c: float):
        self.s = s.double()
        n_f, k = self.s.shape
        self.n_f, self.k = n_f, k
        self.trace = float((self.s * self.s).sum()) / n_f
        self.lam = c * self.trace / min(k, n_f)
        if self.lam <= 0:
            raise ValueError("curvature='fisher' needs lambda_reg > 0 (relative to the mean "
                             "eigenvalue of each layer's Fisher)")
        eye = torch.eye(min(k, n_f), dtype=torch.float64, device=self.s.device)
        if k <= n_f:
            self.chol = torch.linalg.cholesky(self.s.T @ self.s / n_f + self.lam * eye)
        else:
            self.chol = torch.linalg.cholesky(self.s @ self.s.T + n_f * self.lam * eye)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``(F + lambda I)^-1 v`` for ``v [k, r]``."""
        v = v.double()
        if self.k <= self.n_f:
            return torch.cholesky_solve(v, self.chol)
        return (v - self.s.T @ torch.cholesky_solve(self.s @ v, self.chol)) / self.lam


def fisher_scores(train: ArrayLike, sampled: Optional[ArrayLike], targets: ArrayLike,
                  blocks: Sequence[FeatureBlock], c: float,
                  device: Optional[Union[str, torch.device]] = None,
                  out: Optional[torch.Tensor] = None, sampled_offset: int = 0) -> torch.Tensor:
    """``out += sum_l G_l (F_l + lambda_l I)^-1 T_l^T`` (see the module docstring); ``out``
    ``[n, t]`` float64 (created when ``None``). A layer whose sampled gradients are all zero
    (its parameters do not affect the output) contributes nothing. ``sampled=None``: ``S`` is
    ``train[:, sampled_offset:]`` (a store's ``[G | S]`` rows, read a layer at a time)."""
    def block(x, start, stop):
        part = x[:, start:stop]
        if isinstance(part, torch.Tensor):
            return part.to(device=device, dtype=torch.float64)
        return torch.from_numpy(np.array(part, dtype=np.float64)).to(device)
    if sampled is None:
        sampled, shift = train, sampled_offset
    else:
        shift = 0
    t = targets if isinstance(targets, torch.Tensor) else torch.from_numpy(np.asarray(targets))
    if out is None:
        out = torch.zeros(train.shape[0], t.shape[0], dtype=torch.float64)
    for b in blocks:
        s_l = block(sampled, b.start + shift, b.stop + shift)
        if not bool((s_l != 0).any()):
            continue
        solver = FisherSolve(s_l, c)
        w = solver.solve(block(t, b.start, b.stop).T)                          # [k_l, t]
        out += (block(train, b.start, b.stop) @ w).cpu()
    return out
