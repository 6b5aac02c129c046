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

from . import checks, distributed
from .featurize import (DEFAULT_GRAD_MEMORY, Batch, Device, FeatureSpec, _check_grad_memory,
                        Featurizer, featurize, num_grad_params)
from .fingerprint import Ledger
from .projection import _MAX_SEED, _check_int, _check_kind, _check_nnz
from .kernel import compute_kernels, kernel_blocks, kernel_row_weights, resolve_kernel_weights
from .score import block_scores, damping, finish_ensemble, trak_feature_scale
from .tasks import Task, get_task


def attribute(model: torch.nn.Module, checkpoints: Sequence[Mapping[str, torch.Tensor]],
              train: Iterable[Batch], targets: Iterable[Batch], *,
              task: Union[str, Task] = "classification", proj_dim: Optional[int] = 2048,
              kind: str = "rademacher", seed: int = 0, lambda_reg: Optional[float] = None,
              relative_lambda: Optional[bool] = None, ensemble: str = "mean",
              grad_wrt: Optional[Sequence[str]] = None, device: Optional[Device] = None,
              grad_memory: int = DEFAULT_GRAD_MEMORY, gradients: str = "auto",
              projection: str = "dense", factored_dims: Optional[Sequence[int]] = None,
              kernel: str = "full", kernel_weights: Optional[str] = None,
              progress: bool = True, nnz: int = 4) -> torch.Tensor:
    """TRAK scores ``[n_train, n_targets]``: how much each train example drove each target's output.

    Args:
        model: the module defining the forward pass; never modified (checkpoints are applied
            with ``torch.func.functional_call``).
        checkpoints: state_dicts; checkpoint ``m`` gets ``model_id = m``.
        train, targets: iterables of batches in a fixed order, e.g. ``(inputs, labels)`` from
            a DataLoader without shuffling; iterated once per checkpoint. Every example is
            fingerprinted (:mod:`trak_fast.fingerprint`): a later checkpoint that sees other
            examples, or the same in another order, raises
            :class:`~trak_fast.fingerprint.ExampleMismatchError` before featurizing them.
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
        gradients: ``"auto"`` (module hooks for Linear/Conv2d/Conv1D layers when the task has
            batched ``outputs``, vmap for the rest), ``"hooks"`` or ``"vmap"``.
        projection: ``"dense"`` or ``"factored"`` (per-layer ``vec(P_out^T G P_in)``,
            ``factored_dims = (k_out, k_in)``, default 16 x 16; ``proj_dim`` is then unused), or
            ``"per_layer"`` (``proj_dim`` split over the layers, one matrix each).
        kernel: ``"full"`` (one kernel over all features) or ``"per_layer"`` (its block
            diagonal by layer, each block damped relative to its own trace; needs a layout by
            layer: ``projection="per_layer"`` or ``"factored"``, or raw gradients).
        kernel_weights: row weights of the kernel ``Phi^T W Phi``: ``"none"`` (TRAK's),
            ``"out_to_loss"`` (``W = Q``) or ``"fisher"`` (``W = Q^2``, the empirical Fisher
            of the loss; see :func:`trak_fast.kernel.kernel_row_weights`). Default ``None``:
            ``DEFAULT_KERNEL_WEIGHTS = "out_to_loss"`` for ``ensemble="mean"``, ``"none"`` for
            ``"trak"``.
        progress: show tqdm progress bars.

    Raises:
        ValueError: among others, when every train feature of a checkpoint is zero (the task
            output does not depend on the ``grad_wrt`` parameters, or forward detaches).

    Returns:
        ``tau`` ``[n_train, n_targets]``, float32 on the CPU (float64 for a float64 model).
    """
    task = get_task(task)
    lambda_reg, relative_lambda = damping(ensemble, lambda_reg, relative_lambda)
    kernel_weights = resolve_kernel_weights(kernel_weights, ensemble)
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of state_dicts, got "
                        f"{type(checkpoints).__name__}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints must hold at least one state_dict, got an empty list")

    if ensemble == "trak" and (projection != "dense" or kernel != "full" or kernel_weights != "none"):
        raise ValueError("ensemble='trak' reproduces MadryLab trak's dense projection; it "
                         f"cannot be combined with projection={projection!r}, kernel={kernel!r}, "
                         f"kernel_weights={kernel_weights!r}")
    # Everything cheap is checked before the first gradient (see trak_fast.checks).
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    FeatureSpec(model, task, proj_dim=proj_dim, grad_wrt=grad_wrt, gradients=gradients,
                projection=projection, factored_dims=factored_dims)     # validates them
    kind_id = _check_kind(kind)
    if proj_dim is not None:
        _check_nnz(nnz, kind_id, proj_dim)
    _check_int("seed", seed, 0, _MAX_SEED)
    _check_grad_memory(grad_memory)
    compute_device = distributed.local_device(checks.compute_device(model, device), device)
    checks.check_checkpoints(model, checkpoints)
    run = checks.model_fn(model, checkpoints[0], compute_device)
    train = checks.prepare_loader(train, "train", model=model, run=run, task=task,
                                  device=compute_device, passes=len(checkpoints))
    targets = checks.prepare_loader(targets, "targets", model=model, run=run, task=task,
                                    device=compute_device, passes=len(checkpoints))
    del run      # frees this copy of checkpoint 0's tensors before featurizing makes its own

    settings = dict(task=task, proj_dim=proj_dim, kind=kind, nnz=nnz, seed=seed, grad_wrt=grad_wrt,
                    device=compute_device, grad_memory=grad_memory, gradients=gradients,
                    projection=projection, factored_dims=factored_dims, progress=progress)
    score_sum = None
    q_sum = None
    n = t = None
    # Checkpoint 0's pass over each loader is fingerprinted; later checkpoints must see the
    # same examples in the same order (see trak_fast.fingerprint), checked before each batch.
    seen = {"train": None, "targets": None}
    distributed.agree("attribute", {"checkpoints": len(checkpoints), "ensemble": ensemble,
                                    "proj_dim": proj_dim, "seed": seed, "kind": kind,
                                    "kernel": kernel, "kernel_weights": kernel_weights})
    for model_id, checkpoint in enumerate(checkpoints):
        ledgers = {what: Ledger(what, seen[what], against=f"the {what} examples checkpoint 0 saw")
                   for what in seen}
        if distributed.active():     # batch b featurized by rank b % W, gathered on every rank
            featurizer = Featurizer(model, checkpoint, model_id=model_id,
                                    **{k: v for k, v in settings.items() if k != "progress"})
            phi, q = distributed.featurize_shares(featurizer, train, task=task, what="train",
                                                  out_to_loss=True, before_batch=ledgers["train"])
            phi_targets = distributed.featurize_shares(
                featurizer, targets, task=task, what="targets", out_to_loss=False,
                before_batch=ledgers["targets"])[0]
            layout = featurizer.layout
        else:
            features = featurize(model, checkpoint, train, model_id=model_id, what="train",
                                 before_batch=ledgers["train"], **settings)
            phi, q = features
            phi_targets = featurize(model, checkpoint, targets, model_id=model_id, what="targets",
                                    out_to_loss=False, before_batch=ledgers["targets"],
                                    **settings).phi
            layout = features.layout
        if model_id == 0:
            seen = {what: ledger.hashes for what, ledger in ledgers.items()}
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
        blocks = kernel_blocks(layout, phi.shape[1], kernel)
        kernels = compute_kernels(phi, blocks, form="primal" if ensemble == "trak" else "auto",
                                  device=compute_device, where=f"checkpoint {model_id}",
                                  weights=kernel_row_weights(kernel_weights, q))
        block_scores(phi, phi_targets, kernels, lambda_reg=lambda_reg,
                     relative_lambda=relative_lambda, feature_scale=scale,
                     normalize_inverse=ensemble == "trak", out=score_sum, device=compute_device,
                     progress=False)
        q_sum += q.to(torch.float64)
    finish_ensemble(score_sum, q_sum, len(checkpoints))
    return score_sum

