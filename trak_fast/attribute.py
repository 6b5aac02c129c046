"""``attribute``: TRAK scores in one in-memory call, for small problems, tests and notebooks.

For each checkpoint m (one at a time, so only one checkpoint's features are in memory)::

    Phi_m, Q_m = featurize(train)          # [n, k], [n]
    T_m        = featurize(targets)        # [t, k]
    K_m        = Phi_m^T Phi_m             # float64 (or the dual Phi_m Phi_m^T when k > n)
    S_m        = Phi_m (K_m + lambda_m I)^-1 T_m^T

and ``tau = mean_m(S_m) * mean_m(Q_m)[:, None]`` (see :mod:`trak_fast.score`). For datasets
that do not fit in memory, or runs that must survive interruption, use :class:`trak_fast.TRAK`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from .featurize import DEFAULT_GRAD_MEMORY, Batch, Device, featurize, model_device, num_grad_params
from .kernel import check_kernel, compute_kernel
from .score import damping, finish_ensemble, model_scores, trak_feature_scale
from .tasks import Task, get_task


def attribute(model: torch.nn.Module, checkpoints: Sequence[Mapping[str, torch.Tensor]],
              train: Iterable[Batch], targets: Iterable[Batch], *,
              task: Union[str, Task] = "classification", proj_dim: Optional[int] = 2048,
              kind: str = "rademacher", seed: int = 0, lambda_reg: Optional[float] = None,
              relative_lambda: Optional[bool] = None, ensemble: str = "mean",
              grad_wrt: Optional[Sequence[str]] = None, device: Optional[Device] = None,
              grad_memory: int = DEFAULT_GRAD_MEMORY, progress: bool = True,
              nnz: int = 4) -> torch.Tensor:
    """TRAK scores ``[n_train, n_targets]``: how much each train example drove each target's output.

    Args:
        model: the module defining the forward pass; never modified (checkpoints are applied
            with ``torch.func.functional_call``).
        checkpoints: state_dicts; checkpoint ``m`` gets ``model_id = m``.
        train, targets: iterables of batches in a fixed order, e.g. ``(inputs, labels)`` from
            a DataLoader without shuffling; iterated once per checkpoint.
        task: ``"classification"`` (margin, ``Q = 1 - p``), ``"regression"``, or a
            :class:`~trak_fast.Task`.
        proj_dim: ``k``; ``None`` uses the raw gradients as features.
        kind, seed: the projection; checkpoint m uses ``model_seed(seed, m)``.
        nnz: nonzeros per row for ``kind="sparse"``.
        lambda_reg, relative_lambda: the damping. Defaults: for ``ensemble="mean"``,
            ``lambda = DEFAULT_LAMBDA_REL * tr(Phi^T Phi) / n`` (relative, scale-free); for
            ``ensemble="trak"``, ``lambda_reg = 0`` absolute, as MadryLab trak. Pass
            ``relative_lambda=False`` for an absolute value.
        ensemble: ``"mean"`` (the paper's estimator) or ``"trak"`` (MadryLab trak 0.3.2's
            scaling and per-checkpoint normalization, reproduced exactly).
        grad_wrt: parameter names to differentiate; the others' gradients are never computed.
        device: where to compute (``None``: the model's device).
        grad_memory: bytes for one group of per-example gradients (see :mod:`trak_fast.featurize`).
        progress: show tqdm progress bars.

    Raises:
        ValueError: among others, when every train feature of a checkpoint is zero (the task
            output does not depend on the ``grad_wrt`` parameters, or forward detaches).

    Returns:
        ``tau`` ``[n_train, n_targets]``, float32 on the CPU (float64 for a float64 model).
    """
    task = get_task(task)
    lambda_reg, relative_lambda = damping(ensemble, lambda_reg, relative_lambda)
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of state_dicts, got "
                        f"{type(checkpoints).__name__}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints must hold at least one state_dict, got an empty list")

    settings = dict(task=task, proj_dim=proj_dim, kind=kind, nnz=nnz, seed=seed, grad_wrt=grad_wrt,
                    device=device, grad_memory=grad_memory, progress=progress)
    score_sum = None
    q_sum = None
    n = t = None
    for model_id, checkpoint in enumerate(checkpoints):
        phi, q = featurize(model, checkpoint, train, model_id=model_id, what="train", **settings)
        phi_targets = featurize(model, checkpoint, targets, model_id=model_id, what="targets",
                                out_to_loss=False, **settings).phi
        if n is None:
            n, t = phi.shape[0], phi_targets.shape[0]
            score_sum = torch.zeros(n, t, dtype=phi.dtype)
            q_sum = torch.zeros(n, dtype=torch.float64)
        elif (phi.shape[0], phi_targets.shape[0]) != (n, t):
            raise ValueError(
                f"checkpoint {model_id} saw {phi.shape[0]} train and {phi_targets.shape[0]} "
                f"target examples, checkpoint 0 saw {n} and {t}: train and targets must yield "
                "the same examples every time they are iterated (a list or a DataLoader, not a "
                "generator)")
        scale = 1.0
        if ensemble == "trak":
            num_params = phi.shape[1] if proj_dim is None else num_grad_params(model, grad_wrt)
            scale = trak_feature_scale(proj_dim, num_params)
        compute_device = model_device(model) if device is None else torch.device(device)
        kernel = check_kernel(compute_kernel(phi, form="primal" if ensemble == "trak" else "auto",
                                             device=compute_device), f"checkpoint {model_id}")
        model_scores(phi, phi_targets, kernel, lambda_reg=lambda_reg,
                     relative_lambda=relative_lambda, feature_scale=scale,
                     normalize_inverse=ensemble == "trak", out=score_sum, device=compute_device,
                     progress=False)
        q_sum += q.to(torch.float64)
    finish_ensemble(score_sum, q_sum, len(checkpoints))
    return score_sum

