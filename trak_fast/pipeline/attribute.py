"""``attribute``: TRAK scores in one in-memory call, for small problems, tests and notebooks.

For each checkpoint m (one at a time, so only one checkpoint's features are in memory)::

    Phi_m, Q_m = featurize(train)          # [n, k], [n]
    T_m        = featurize(targets)        # [t, k]
    K_m        = Phi_m^T W_m Phi_m         # float64 (or the dual Phi_m Phi_m^T when k > n)
    S_m        = Phi_m (K_m + lambda_m I)^-1 T_m^T

and ``tau = mean_m(S_m) * mean_m(Q_m)[:, None]`` (see :mod:`trak_fast.scoring.scores`). For
datasets that do not fit in memory, or runs that must survive interruption, use
:class:`trak_fast.TRAK`.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from ..features.featurizer import Featurizer, FisherFeaturizer
from ..features.loop import featurize_with
from ..features.model import Batch, Device, compute_device
from ..features.spec import FeatureSpec
from ..features.tasks import Task, get_task
from ..scoring.fisher import fisher_scores
from ..scoring.kernel import compute_kernels, kernel_blocks, kernel_row_weights
from ..scoring.scores import add_checkpoint_scores, finish_ensemble
from ..settings import FeatureSettings, ScoreSettings, split_options
from . import checks, distributed
from .fingerprint import Ledger


def attribute(model: torch.nn.Module, checkpoints: Sequence[Mapping[str, torch.Tensor]],
              train: Iterable[Batch], targets: Iterable[Batch], *,
              task: Union[str, Task] = "classification",
              features: Optional[FeatureSettings] = None, scoring: Optional[ScoreSettings] = None,
              device: Optional[Device] = None, progress: bool = True,
              optimizer_states: Optional[Sequence[Any]] = None,
              **options: Any) -> torch.Tensor:
    """TRAK scores ``[n_train, n_targets]``: how much each train example drove each target's output.

    Args:
        model: the module defining the forward pass; never modified (checkpoints are applied
            with ``torch.func.functional_call``).
        checkpoints: state_dicts; checkpoint ``m`` gets ``model_id = m``.
        train, targets: iterables of batches in a fixed order, e.g. ``(inputs, labels)`` from
            a DataLoader without shuffling; iterated once per checkpoint. Every example is
            fingerprinted (:mod:`trak_fast.pipeline.fingerprint`): a later checkpoint that sees
            other examples, or the same in another order, raises
            :class:`~trak_fast.ExampleMismatchError` before featurizing them.
        task: ``"classification"`` (margin, ``Q = 1 - p``), ``"regression"``,
            ``"language_modeling"`` or a :class:`~trak_fast.Task`.
        features: :class:`~trak_fast.FeatureSettings` (``proj_dim``, ``kind``, ``seed``,
            ``projection``, ``gradients``, ``grad_wrt``, ...).
        scoring: :class:`~trak_fast.ScoreSettings` (``ensemble``, ``lambda_reg``, ``kernel``,
            ``kernel_weights``, ...).
        device: where to compute (``None``: the model's device).
        progress: show tqdm progress bars.
        optimizer_states: one Adam state per checkpoint (``optimizer.state_dict()`` saved with
            it, or ``{name: v_hat}``): every gradient (train, targets, Fisher) is divided by
            that checkpoint's ``sqrt(v_hat) + eps`` before projection, TrackStar's
            normalization (:mod:`trak_fast.features.gradients.second_moment`).
        **options: any field of either settings class as a keyword (``proj_dim=512``,
            ``lambda_reg=1.0``); it overrides the object's field.

    Raises:
        ValueError: among others, when every train feature of a checkpoint is zero (the task
            output does not depend on the ``grad_wrt`` parameters, or forward detaches).

    Returns:
        ``tau`` ``[n_train, n_targets]``, float32 on the CPU (float64 for a float64 model).
    """
    task = get_task(task)
    features, scoring = split_options(options, features=features, scoring=scoring,
                                      where="attribute()", task=task)
    scoring.check_features(features)
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of state_dicts, got "
                        f"{type(checkpoints).__name__}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints must hold at least one state_dict, got an empty list")
    # Everything cheap is checked before the first gradient (see trak_fast.pipeline.checks).
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = distributed.local_device(compute_device(model, device), device)
    checks.check_checkpoints(model, checkpoints)
    states = _optimizer_states(optimizer_states, len(checkpoints))
    spec = FeatureSpec(model, task, features)       # once: every checkpoint has the same
    featurizer = Featurizer(model, checkpoints[0], task=task, settings=features, device=device,
                            spec=spec, optimizer_state=states[0])
    train = checks.prepare_loader(train, "train", model=model, run=featurizer.run, task=task,
                                  device=device, passes=len(checkpoints))
    targets = checks.prepare_loader(targets, "targets", model=model, run=featurizer.run,
                                    task=task, device=device, passes=len(checkpoints))
    distributed.agree("attribute", {"checkpoints": len(checkpoints), **vars(features),
                                    **vars(scoring), "task": task.name})
    if scoring.curvature == "fisher":
        return _fisher_attribute(model, checkpoints, train, targets, task, features, scoring,
                                 featurizer, device, progress, states)
    score_sum = q_sum = None
    examples = _SameExamples()
    for model_id, checkpoint in enumerate(checkpoints):
        if model_id > 0:
            featurizer = Featurizer(model, checkpoint, task=task, settings=features,
                                    model_id=model_id, device=device, spec=spec,
                                    optimizer_state=states[model_id])
        ledgers = examples.ledgers()
        phi, q = _features(featurizer, train, "train", ledgers["train"], progress)
        phi_targets = _features(featurizer, targets, "targets", ledgers["targets"], progress)[0]
        examples.check(model_id, ledgers, phi.shape[0], phi_targets.shape[0])
        if model_id == 0:
            score_sum = torch.zeros(phi.shape[0], phi_targets.shape[0], dtype=phi.dtype)
            q_sum = torch.zeros(phi.shape[0], dtype=torch.float64)
        blocks = kernel_blocks(featurizer.layout, phi.shape[1], scoring.kernel)
        kernels = compute_kernels(phi, blocks,
                                  form="primal" if scoring.ensemble == "trak" else "auto",
                                  device=device, where=f"checkpoint {model_id}",
                                  weights=kernel_row_weights(scoring.kernel_weights, q))
        add_checkpoint_scores(phi, phi_targets, kernels, scoring, out=score_sum,
                              proj_dim=featurizer.proj_dim,
                              num_grad_params=featurizer.num_grad_params, device=device)
        q_sum += q.to(torch.float64)
    finish_ensemble(score_sum, q_sum, len(checkpoints))
    return score_sum


def _optimizer_states(states: Optional[Sequence[Any]], count: int) -> List[Any]:
    """One optimizer state (or ``None``) per checkpoint."""
    if states is None:
        return [None] * count
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError("optimizer_states must be a list with one optimizer state per checkpoint, "
                        f"got {type(states).__name__}")
    if len(states) != count:
        raise ValueError(f"optimizer_states has {len(states)} entries for {count} checkpoints: "
                         "give one per checkpoint")
    if any(state is None for state in states):
        raise ValueError("optimizer_states: every checkpoint needs its state (None found)")
    return list(states)


class _SameExamples:
    """Checkpoint 0's pass over each loader is fingerprinted; later checkpoints must see the
    same examples in the same order (see trak_fast.pipeline.fingerprint), and as many."""

    def __init__(self):
        self.seen = {"train": None, "targets": None}
        self.sizes = None

    def ledgers(self):
        return {what: Ledger(what, self.seen[what], against=f"the {what} examples checkpoint 0 saw")
                for what in self.seen}

    def check(self, model_id: int, ledgers, n: int, t: int) -> None:
        if model_id == 0:
            self.seen = {what: ledger.hashes for what, ledger in ledgers.items()}
            self.sizes = (n, t)
        elif (n, t) != self.sizes:
            raise ValueError(
                f"checkpoint {model_id} saw {n} train and {t} target examples, checkpoint 0 saw "
                f"{self.sizes}: train and targets must yield the same examples every time they "
                "are iterated (a list or a DataLoader, not a generator)")


def _features(featurizer: Featurizer, loader: Iterable[Batch], what: str, ledger: Ledger,
              progress: bool):
    """``(phi, Q or None)`` of a loader: split over ranks under a process group (batch ``b``
    by rank ``b % W``, gathered on every rank), else in this process."""
    out_to_loss = what == "train"
    if distributed.active():
        return distributed.featurize_shares(featurizer, loader, what=what,
                                            out_to_loss=out_to_loss, before_batch=ledger)
    return tuple(featurize_with(featurizer, loader, what=what, out_to_loss=out_to_loss,
                                before_batch=ledger, progress=progress))


def _fisher_attribute(model, checkpoints, train, targets, task: Task, features: FeatureSettings,
                      scoring: ScoreSettings, featurizer: Featurizer, device, progress: bool,
                      states: Sequence[Any]) -> torch.Tensor:
    """``curvature="fisher"`` (see :mod:`trak_fast.scoring.fisher`): per checkpoint, the train
    log-likelihood and sampled-label gradients ``[G | S]`` in one pass over ``train``
    (:class:`~trak_fast.features.featurizer.FisherFeaturizer`) and the targets' output
    gradients ``T``, all with checkpoint ``m``'s projection; ``tau = mean_m(scores_m)``."""
    total = None
    examples = _SameExamples()
    fisher_spec = None       # one per model, as for the targets' featurizer
    for model_id, checkpoint in enumerate(checkpoints):
        if model_id > 0:
            featurizer = Featurizer(model, checkpoint, task=task, settings=features,
                                    model_id=model_id, device=device, spec=featurizer.spec,
                                    optimizer_state=states[model_id])
        rows = FisherFeaturizer(model, checkpoint, task=task, settings=features,
                                model_id=model_id, device=device, spec=fisher_spec,
                                optimizer_state=states[model_id])
        fisher_spec = rows.spec
        ledgers = examples.ledgers()
        gs = _features(rows, train, "train", ledgers["train"], progress)[0]
        t = _features(featurizer, targets, "targets", ledgers["targets"], progress)[0]
        examples.check(model_id, ledgers, gs.shape[0], t.shape[0])
        if model_id == 0:
            total = torch.zeros(gs.shape[0], t.shape[0], dtype=torch.float64)
        k = t.shape[1]
        blocks = kernel_blocks(featurizer.layout, k, scoring.kernel)
        fisher_scores(gs[:, :k], gs[:, k:], t, blocks, scoring.lambda_reg, device=device,
                      out=total, chunks=rows.chunks, normalize=scoring.normalize)
    dtype = torch.float64 if featurizer.dtype == torch.float64 else torch.float32
    return (total / len(checkpoints)).to(dtype)
