"""The kernel ``K = Phi^T Phi``, its damping, and a solve that never fails.

Shapes: ``Phi [n, k]`` (n train rows, k features). The kernel is accumulated in float64 over
row blocks, so ``Phi`` can be a disk-backed memmap larger than memory::

    K = sum_blocks Phi_b^T Phi_b                                    # [k, k], float64

**Damping.** Scores use ``(K + lambda I)^-1``. A fixed ``lambda`` means different things for
different models, layers and feature scalings, so by default it is relative::

    lambda = lambda_rel * tr(K) / n           # tr(K) / n = mean squared feature norm

which is invariant to rescaling ``Phi`` (scores are then unchanged by any feature scale).
``DEFAULT_LAMBDA_REL = 3.0``, chosen with the LDS harness (``benchmarks/lds.py``, results in
``benchmarks/results/lds.md``): at k = 512 and M = 1 / 5 / 20 checkpoints, lambda_rel = 3 gave
the best linear datamodeling score of the sweep 0.01 .. 100 on digits (MLP 64-128-10: 0.548 /
0.589 / 0.591, against 0.518 / 0.567 / 0.568 at 1 and 0.26 / 0.32 / 0.34 at 0.01) and on a
deeper digits MLP, and beat lambda_rel = 1 in all nine columns of three problems. On the
second data set (breast_cancer) the LDS keeps rising with damping up to the gradient dot
product (lambda -> infinity); no default suits every problem, so tune it when it matters.
Heavy damping is what makes TRAK's linearisation useful: with k > n the undamped kernel is
singular.

**Solve.** Damped Cholesky of ``K + lambda I`` in float64. When ``lambda = 0`` or the factorization
fails (a singular kernel), an eigendecomposition gives the pseudo-inverse instead (eigenvalues
below ``k * eps * max eigenvalue`` are dropped), so the solve never fails. The pipelines
(``attribute``, ``TRAK``) first pass the kernel through :func:`check_kernel`: a zero kernel means
every feature is zero, and silently returning all-zero scores would hide that mistake.

**Per layer.** ``kernel="per_layer"`` replaces ``K`` by its block diagonal over the feature
layout's layers (:func:`trak_fast.layout.layer_blocks`): ``K_l = Phi_l^T Phi_l`` with its own
``lambda_l = lambda_rel * tr(K_l) / n``, and the scores become a sum over layers (see
:mod:`trak_fast.score`). Each block is scale-free on its own, so a layer with small gradients
is no longer drowned by one with large gradients; that is the structure of LoGra's and EK-FAC's
per-layer curvature. :func:`compute_kernels` returns the blocks with their kernels.

**Dual form.** When ``k > n`` the ``n x n`` Gram matrix ``G = Phi Phi^T`` is smaller, and
``Phi (Phi^T Phi + lambda I)^-1 = (Phi Phi^T + lambda I)^-1 Phi`` gives the same scores
(``tr(G) = tr(K)``, so the damping is the same). :func:`compute_kernel` picks the smaller one.
"""
from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..features.layout import FeatureBlock, layer_blocks
from ..settings import DEFAULT_LAMBDA_REL, KERNEL_WEIGHTS, KERNELS, check_choice  # noqa: F401

logger = logging.getLogger("trak_fast")


#: Rows of Phi moved to the compute device at a time.
DEFAULT_BLOCK_ROWS = 8192

ArrayLike = Union[torch.Tensor, np.ndarray]


def rows(phi: ArrayLike, start: int, stop: int, device: torch.device,
         dtype: torch.dtype) -> torch.Tensor:
    """``phi[start:stop]`` as a tensor on ``device`` in ``dtype`` (works for numpy memmaps)."""
    block = phi[start:stop]
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.array(block))  # a private, writable copy of the rows
    return block.to(device=device, dtype=dtype)


def _shape(phi: ArrayLike, name: str = "phi") -> tuple:
    if not isinstance(phi, (torch.Tensor, np.ndarray)) or phi.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor or array [n, k], got "
                         f"{getattr(phi, 'shape', type(phi).__name__)}")
    return tuple(phi.shape)


def kernel_matrix(phi: ArrayLike, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                  device: Optional[Union[str, torch.device]] = None,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``K = Phi^T W Phi`` ``[k, k]`` in float64 (``W = diag(weights)``, default ``I``),
    accumulated over blocks of ``block_rows`` rows."""
    n, k = _shape(phi)
    device = torch.device(device) if device is not None else _device_of(phi)
    kernel = torch.zeros(k, k, dtype=torch.float64, device=device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = rows(phi, start, stop, device, torch.float64)
        left = block if weights is None else block * weights[start:stop, None].to(block)
        kernel.addmm_(left.T, block)
    return kernel


def gram_matrix(phi: ArrayLike, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """``G = Phi Phi^T`` ``[n, n]`` in float64 (the dual kernel), built block by block."""
    n, _ = _shape(phi)
    device = torch.device(device) if device is not None else _device_of(phi)
    gram = torch.empty(n, n, dtype=torch.float64, device=device)
    for i in range(0, n, block_rows):
        left = rows(phi, i, min(n, i + block_rows), device, torch.float64)
        for j in range(0, n, block_rows):
            right = rows(phi, j, min(n, j + block_rows), device, torch.float64)
            gram[i:i + left.shape[0], j:j + right.shape[0]] = left @ right.T
    return gram


def _device_of(phi: ArrayLike) -> torch.device:
    return phi.device if isinstance(phi, torch.Tensor) else torch.device("cpu")


class Kernel(NamedTuple):
    """A finalized kernel: ``matrix`` is ``Phi^T Phi`` (``form="primal"``, ``[k, k]``) or
    ``Phi Phi^T`` (``form="dual"``, ``[n, n]``), float64; ``n`` train rows."""

    matrix: torch.Tensor
    form: str
    n: int
    #: Row weights ``w [n]`` of a weighted kernel ``Phi^T diag(w) Phi`` (``None``: unweighted).
    #: A primal ``matrix`` already includes them; a dual one is the plain Gram matrix and the
    #: weights are applied when solving (see :mod:`trak_fast.score`).
    weights: Optional[torch.Tensor] = None

    @property
    def trace(self) -> float:
        """``tr(Phi^T W Phi)``, which is also ``tr(W^1/2 Phi Phi^T W^1/2)``."""
        diagonal = torch.diagonal(self.matrix)
        if self.form == "dual" and self.weights is not None:
            diagonal = diagonal * self.weights.to(diagonal)
        return float(diagonal.sum())


def compute_kernel(phi: ArrayLike, *, form: str = "auto", block_rows: int = DEFAULT_BLOCK_ROWS,
                   device: Optional[Union[str, torch.device]] = None,
                   weights: Optional[torch.Tensor] = None) -> Kernel:
    """The kernel of ``Phi`` in the smaller form (``"auto"``: primal when ``k <= n``), with
    optional row ``weights [n]`` (``Phi^T diag(weights) Phi``)."""
    n, k = _shape(phi)
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()
        if weights.shape != (n,) or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"kernel weights must be {n} finite values >= 0, got shape "
                             f"{tuple(weights.shape)}")
    if form == "auto":
        form = "primal" if k <= n else "dual"
    if form == "primal":
        return Kernel(kernel_matrix(phi, block_rows=block_rows, device=device, weights=weights),
                      form, n, weights)
    if form == "dual":
        return Kernel(gram_matrix(phi, block_rows=block_rows, device=device), form, n, weights)
    raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")


#: ``kernel_weights=`` choices: the row weights ``w_i`` of ``K = sum_i w_i phi_i phi_i^T``.
def kernel_row_weights(kernel_weights: str, out_to_loss: Optional[torch.Tensor]
                       ) -> Optional[torch.Tensor]:
    """``None`` (``"none"``), ``Q`` (``"out_to_loss"``) or ``Q^2`` (``"fisher"``), float64.

    With ``w = Q^2``, ``K = sum_i (Q_i phi_i)(Q_i phi_i)^T`` is the empirical Fisher of the
    training *loss* in feature space (``grad loss_i = -Q_i grad f_i``), the curvature of
    influence functions, LoGra and EK-FAC; TRAK's ``Phi^T Phi`` weights every example alike.
    """
    check_choice("kernel_weights", kernel_weights, KERNEL_WEIGHTS)
    if kernel_weights == "none":
        return None
    if out_to_loss is None:
        raise ValueError(f"kernel_weights={kernel_weights!r} needs the train examples' "
                         "out-to-loss weights Q")
    q = out_to_loss.detach().cpu().double() if isinstance(out_to_loss, torch.Tensor) else \
        torch.from_numpy(np.array(out_to_loss, dtype=np.float64))
    q = q.reshape(-1)
    if (q < 0).any():
        raise ValueError(f"kernel_weights={kernel_weights!r} needs Q >= 0 (classification's "
                         "1 - p); this task's Q has negative values (use 'none')")
    return q if kernel_weights == "out_to_loss" else q * q


ZERO_FEATURES_MESSAGE = (
    "every train feature is zero: the task output does not depend on the differentiated "
    "parameters (check grad_wrt, and that forward does not detach)")


def check_kernel(kernel: Kernel, where: str = "") -> Kernel:
    """Refuses a kernel whose features cannot give meaningful scores; returns it otherwise.

    ``tr(K) = sum_i ||phi_i||^2``, so a zero trace means every train feature is zero. The
    solve would still succeed (the pseudo-inverse of 0 is 0) and every score would be an exact
    0, which looks like a result; it almost always means the gradients never reached the
    differentiated parameters. A non-finite trace means NaN or inf features (a diverged
    checkpoint, or float16 overflow), which would turn every score into NaN.
    """
    trace = kernel.trace
    prefix = f"{where}: " if where else ""
    if not np.isfinite(trace):
        raise ValueError(f"{prefix}the train features hold NaN or inf (tr(Phi^T Phi) = {trace}); "
                         "check the checkpoint and the task output")
    if trace == 0:
        raise ValueError(prefix + ZERO_FEATURES_MESSAGE)
    return kernel


def resolve_lambda(trace: float, n: int, lambda_reg: float, relative: bool) -> float:
    """The absolute damping: ``lambda_reg * trace / n`` when ``relative``, else ``lambda_reg``."""
    if isinstance(lambda_reg, bool) or not isinstance(lambda_reg, (int, float)) \
            or not np.isfinite(lambda_reg) or lambda_reg < 0:
        raise ValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}")
    if n < 1:
        raise ValueError(f"the kernel needs at least one train row, got n = {n}")
    return float(lambda_reg) * trace / n if relative else float(lambda_reg)


class RegularizedInverse:
    """``(A + lambda I)^-1`` for a symmetric positive semi-definite ``A`` [d, d], in float64.

    Damped Cholesky when ``lambda > 0`` and the factorization succeeds; otherwise the
    pseudo-inverse from ``torch.linalg.eigh`` (``method`` says which was used).
    """

    def __init__(self, matrix: torch.Tensor, lambda_: float):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [d, d], got {tuple(matrix.shape)}")
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)
        damped = matrix.to(torch.float64) + self.lambda_ * torch.eye(
            matrix.shape[0], dtype=torch.float64, device=matrix.device)
        self._cholesky: Optional[torch.Tensor] = None
        if self.lambda_ > 0:
            factor, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                self._cholesky = factor
        if self._cholesky is None:
            values, vectors = torch.linalg.eigh(damped)
            cutoff = values.abs().max() * damped.shape[0] * torch.finfo(torch.float64).eps
            self._inverse_values = torch.where(values > cutoff, 1.0 / values,
                                               torch.zeros_like(values))
            self._vectors = vectors
        self.method = "cholesky" if self._cholesky is not None else "eigh"

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(A + lambda I)^-1 rhs`` for ``rhs [d, T]``, float64."""
        rhs = rhs.to(torch.float64)
        if self._cholesky is not None:
            return torch.cholesky_solve(rhs, self._cholesky)
        return self._vectors @ (self._inverse_values[:, None] * (self._vectors.T @ rhs))

    def matrix(self) -> torch.Tensor:
        """The inverse itself, ``[d, d]`` float64."""
        if self._cholesky is not None:
            return torch.cholesky_inverse(self._cholesky)
        return (self._vectors * self._inverse_values) @ self._vectors.T


def kernel_blocks(layout: Sequence[FeatureBlock], num_features: int, kernel: str
                  ) -> List[FeatureBlock]:
    """The column blocks that get their own kernel: all columns, or one per layer."""
    check_choice("kernel", kernel, KERNELS)
    if kernel == "full":
        return [FeatureBlock("all", 0, num_features, "all")]
    blocks = layer_blocks(layout)
    if len(blocks) == 1 and blocks[0].layer == "dense":
        raise ValueError("kernel='per_layer' needs features laid out by layer: use "
                         "projection='per_layer' or 'factored', or raw gradients "
                         "(proj_dim=None); a dense projection mixes every layer in every column")
    return blocks


def compute_kernels(phi: ArrayLike, blocks: Sequence[FeatureBlock], *, form: str = "auto",
                    block_rows: int = DEFAULT_BLOCK_ROWS,
                    device: Optional[Union[str, torch.device]] = None, where: str = "",
                    weights: Optional[torch.Tensor] = None
                    ) -> List[Tuple[FeatureBlock, Kernel]]:
    """``[(block, kernel of phi[:, block])]``, each checked by :func:`check_kernel`.

    A layer whose features are all zero (its parameters do not affect the output) is left
    out with a warning; if every block is zero, the error of :func:`check_kernel` is raised.
    """
    kernels = [(block, compute_kernel(phi[:, block.start:block.stop], form=form,
                                      block_rows=block_rows, device=device, weights=weights))
               for block in blocks]
    return nonzero_kernels(kernels, where)


def nonzero_kernels(kernels: Sequence[Tuple[FeatureBlock, Kernel]], where: str = ""
                    ) -> List[Tuple[FeatureBlock, Kernel]]:
    """``kernels`` less the layers whose features are all zero (their parameters do not affect
    the output; dropped with a warning), each checked by :func:`check_kernel`; if every block is
    zero, the error of :func:`check_kernel` is raised."""
    out = []
    for block, kernel in kernels:
        if kernel.trace == 0 and len(kernels) > 1:
            logger.warning("%slayer %s has all-zero features; it is left out of the scores",
                           f"{where}: " if where else "", block.layer)
            continue
        out.append((block, check_kernel(kernel, where)))
    if not out:
        check_kernel(Kernel(torch.zeros(1, 1, dtype=torch.float64), "primal", 1), where)
    return out
