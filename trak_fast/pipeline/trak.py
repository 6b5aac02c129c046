"""``TRAK``: the estimator for real workloads, backed by a resumable on-disk store.

The steps mirror MadryLab's ``TRAKer``::

    trak = TRAK("results/", model, train_size=len(train_set), proj_dim=2048)
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train_loader, model_id=model_id)    # Phi_m, Q_m  (resumable)
    trak.finalize()                                                     # K_m = Phi_m^T Phi_m
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("val", checkpoint, val_loader, model_id=model_id)
    scores = trak.score("val")                                          # [n, t], saved
    best = trak.top_k("val", 5)           # 5 proponents and opponents per target, blockwise

Differences from ``TRAKer``: the model is never modified (checkpoints are applied
functionally); an interrupted ``featurize`` resumes where it stopped and gives bitwise the
same features; the kernel is stored undamped, so ``score`` can be rerun with another
``lambda_reg`` or ``ensemble`` without featurizing again; the damping is relative by default.

One job per checkpoint. Any number of ``TRAK`` objects, in one process or many, may share a
store: each call reads the store's metadata afresh and records only its own change under the
store lock (see :mod:`trak_fast.store`), so jobs featurizing different ``model_id``s never lose
each other's work, and a second job featurizing the same ``model_id`` at the same time gets
:class:`~trak_fast.store.StoreBusyError`. Settings are validated before anything is written,
so a bad argument never leaves a store that later refuses the corrected one.

Under a ``torch.distributed`` process group every method is data-parallel: every rank calls
it with the same arguments and loader, batch ``b`` is featurized by rank ``b % W``, kernels
and scores are split by rows and target columns, and rank 0 writes the metadata (see
:mod:`trak_fast.distributed`, which also turns one rank's failure into an error on all).

Every train and target example is fingerprinted (:mod:`trak_fast.fingerprint`); a resume,
another checkpoint or an experiment's later targets that see other examples, or the same in
another order, raise instead of silently pairing rows of different examples.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..features.featurizer import Featurizer, FisherFeaturizer, fisher_chunks_of
from ..features.loop import featurize_with
from ..features.model import Batch, Device, compute_device, grad_param_names
from ..features.spec import FeatureSpec
from ..features.tasks import Task, get_task
from ..scoring.kernel import compute_kernels, kernel_blocks, kernel_row_weights
from ..scoring.top_k import TopK, top_k
from ..settings import (CURVATURES, ESTIMATOR_FIELDS, FeatureSettings, ScoreSettings, check_choice,
                        feature_settings, score_settings)
from . import checks, distributed
from .fingerprint import Ledger, check_rows, checkpoint_fingerprint, moments_fingerprint
from .store import check_name, open_store, save_array_atomic, store_settings, temp_path
from .store_scores import score_columns
from .train_rows import check_same_train_examples, write_train_features

logger = logging.getLogger("trak_fast")


def _check_model_id(model_id: Any) -> int:
    if isinstance(model_id, bool) or not isinstance(model_id, int) or model_id < 0:
        raise ValueError(f"model_id must be an int >= 0, got {model_id!r}")
    return model_id


class TRAK:
    """TRAK scores for many checkpoints and target sets, stored in ``save_dir``.

    Args:
        save_dir: the store directory (created if needed; reopened and checked if it exists).
        model: the module defining the forward pass; never modified.
        train_size: ``n``, the number of train examples every ``featurize`` call must yield.
        task: ``"classification"``, ``"regression"``, ``"language_modeling"`` or a
            :class:`~trak_fast.Task`.
        features: :class:`~trak_fast.FeatureSettings`; keyword ``options`` (``proj_dim=``,
            ``feature_dtype=``, ...) build or override it. ``feature_dtype="float16"`` halves
            the disk (scores then carry float16 rounding of the features, about 1e-3 relative).
        device: where to compute (``None``: the model's device).
        progress: tqdm progress bars (``False``: quiet).
        curvature: what the store's train rows serve. ``"kernel"``: TRAK's ``Phi_m`` and
            ``Q_m``. ``"fisher"``: per row the log-likelihood gradient and the gradient of
            labels drawn from the model, ``[G | S]`` (``2k`` columns), scored with the
            per-layer Fisher (:mod:`trak_fast.scoring.fisher`; ``finalize`` has nothing to
            save). ``None``: the task's preference for these features (the built-in
            language-modeling task prefers ``"fisher"``), else ``"kernel"``. Recorded in the
            store.

    The settings that decide the features (``proj_dim``, ``kind``, ``seed``, ``grad_wrt``,
    ``feature_dtype``, ``projection``, ...), ``train_size``, the task's name and the number of
    differentiated parameters are recorded; reopening the store with other values raises
    :class:`~trak_fast.StoreMismatchError`.
    """

    def __init__(self, save_dir: Union[str, os.PathLike], model: torch.nn.Module, *,
                 train_size: int, task: Union[str, Task] = "classification",
                 features: Optional[FeatureSettings] = None, device: Optional[Device] = None,
                 progress: bool = True, curvature: Optional[str] = None, **options: Any):
        # Every setting is validated before the store is opened: the store records them on
        # creation, and a bad value written there would make the corrected call a mismatch.
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be a positive int, got {train_size!r}")
        self.task = get_task(task)
        self.settings = feature_settings(options, features, where="TRAK()", task=self.task)
        self.model, self.progress = model, progress
        if curvature is None:
            curvature = self.task.preferred_scoring(self.settings).get("curvature", "kernel")
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        self.device = distributed.local_device(compute_device(model, device), device)
        self.spec = FeatureSpec(model, self.task, self.settings)
        grad_wrt = self.settings.grad_wrt
        self.grad_wrt = None if grad_wrt is None else grad_param_names(model, grad_wrt)
        self.store = open_store(save_dir, store_settings(
            self.settings, self.spec, self.task, train_size, self.grad_wrt, self.curvature,
            fisher_chunks_of(self.task, self.spec)))
        self.train_size, self.layout = train_size, self.spec.layout
        self.num_features = self.spec.num_features

    # Settings as attributes, for reading.
    proj_dim = property(lambda self: self.settings.proj_dim)
    projection = property(lambda self: self.settings.projection)
    feature_dtype = property(lambda self: self.settings.feature_dtype)
    num_grad_params = property(lambda self: self.spec.num_grad_params)

    def _featurizer(self, checkpoint: Mapping[str, torch.Tensor], model_id: int,
                    optimizer_state: Any = None) -> Featurizer:
        return Featurizer(self.model, checkpoint, task=self.task, settings=self.settings,
                          model_id=model_id, device=self.device, spec=self.spec,
                          optimizer_state=optimizer_state)

    def _checked(self, checkpoint: Mapping[str, torch.Tensor], model_id: int, loader: Iterable[Batch],
                 what: str, expected: Optional[int] = None, optimizer_state: Any = None):
        """``(featurizer, loader)`` after the up-front checks (:mod:`trak_fast.pipeline.checks`);
        for the train rows (``expected`` given) of a Fisher store, their featurizer."""
        checks.check_checkpoint(self.model, checkpoint, f"checkpoint {model_id}")
        featurizer = self._featurizer(checkpoint, model_id, optimizer_state)
        loader = checks.prepare_loader(loader, what, model=self.model, run=featurizer.run,
                                       task=self.task, device=self.device, passes=1,
                                       expected=expected)
        if expected is not None and self.curvature == "fisher":
            featurizer = FisherFeaturizer(self.model, checkpoint, task=self.task,
                                          settings=self.settings, model_id=model_id,
                                          device=self.device, optimizer_state=optimizer_state)
        return featurizer, loader

    # ---- train features ---------------------------------------------------------------------

    def featurize(self, checkpoint: Mapping[str, torch.Tensor], train: Iterable[Batch], *,
                  model_id: int, optimizer_state: Any = None) -> None:
        """Writes ``Phi_m [n, k]`` and ``Q_m [n]`` for checkpoint ``model_id``, batch by batch.

        Resumable: batches whose rows are already finished are read from ``train`` but not
        recomputed, so rerunning after an interruption (Ctrl-C, SIGKILL) completes the store
        with bitwise the same features as one uninterrupted run (same loader, same device,
        same torch thread count). ``train`` must yield the same ``train_size`` examples in the
        same order every time, and as every other checkpoint of the store: each example is
        fingerprinted, and a mismatch raises :class:`~trak_fast.ExampleMismatchError` before
        the batch is computed. Other jobs may featurize other ``model_id``s of the store at the
        same time; a concurrent featurize of this ``model_id`` raises
        :class:`~trak_fast.StoreBusyError`. Under a process group, rank ``r`` of ``W``
        computes and writes the batches ``b`` with ``b % W == r`` (rank 0 holds the lock for
        the job); a resume may use another world size. ``optimizer_state``: the checkpoint's
        Adam state, to divide every gradient by its ``sqrt(v_hat) + eps``
        (:mod:`trak_fast.features.gradients.second_moment`); its targets then need the same.
        """
        with distributed.step("featurize: checking the arguments"):
            model_id = _check_model_id(model_id)
            featurizer, train = self._checked(checkpoint, model_id, train, "train",
                                              expected=self.train_size,
                                              optimizer_state=optimizer_state)
        fingerprint = checkpoint_fingerprint(checkpoint)
        moments = moments_fingerprint(featurizer.moments)
        distributed.agree(f"featurize(model_id={model_id})",
                          {"model_id": model_id, "checkpoint": fingerprint, "moments": moments})

        def register(metadata: Dict[str, Any]) -> Dict[str, Any]:
            entry = metadata["models"].get(str(model_id))
            if entry is not None and (entry["checkpoint"], entry.get("second_moments")) != \
                    (fingerprint, moments):
                raise ValueError(f"model_id {model_id} was featurized with a different "
                                 "checkpoint or optimizer_state; use a new model_id or a new save_dir")
            if entry is None:
                entry = {"checkpoint": fingerprint, "featurized": False, "kernels": {}}
                if moments is not None:
                    entry["second_moments"] = moments
                metadata["models"][str(model_id)] = entry
            return entry

        def mark_featurized(metadata: Dict[str, Any]) -> None:
            metadata["models"][str(model_id)]["featurized"] = True
            # Which parameters took hooks, vmap, or were left out (factored): for the reader.
            metadata["models"][str(model_id)]["gradient_paths"] = featurizer.gradient_paths

        # The model's lock is held for the whole run, by rank 0 for all ranks of a job (they
        # write disjoint rows): a second job featurizing this model_id fails fast rather than
        # writing the same rows (and racing on finished.npy) at the same time.
        with contextlib.ExitStack() as held:
            with distributed.step(f"featurize model_id {model_id}: opening its arrays"):
                if distributed.is_main():
                    held.enter_context(self.store.model_lock(model_id))
                    if not self.store.update(register)["featurized"]:
                        self.store.open_train_arrays(model_id, self.feature_dtype)  # creates them
            if self.store.model_entry(model_id)["featurized"]:
                logger.info("model_id %d is already featurized; nothing to do", model_id)
                return
            with distributed.step(f"featurize model_id {model_id}"):
                write_train_features(self.store, featurizer, train, model_id,
                                     feature_dtype=self.feature_dtype,
                                     progress=self.progress and distributed.is_main())
            with distributed.step(f"featurize model_id {model_id}: recording it"):
                if distributed.is_main():
                    self.store.update(mark_featurized)

    def finalize(self, model_ids: Optional[Sequence[int]] = None, *, kernel: str = "full",
                 kernel_weights: Optional[str] = None) -> None:
        """Computes and saves each checkpoint's kernel (``Phi^T W Phi``, or the Gram matrix
        ``Phi Phi^T`` if k > n, the weights then applied when solving).

        ``kernel="per_layer"`` saves the block diagonal instead, one kernel per layer of the
        feature layout; ``kernel_weights`` as in :class:`~trak_fast.ScoreSettings`. Each
        (kernel, kernel_weights) pair is saved separately, so several can be finalized and
        :meth:`score` chooses. ``model_ids=None``: every checkpoint in the store now, including
        those featurized by other jobs since this object was created. Raises ValueError if a
        checkpoint's train features are all zero.
        """
        scoring = ScoreSettings(kernel=kernel, kernel_weights=kernel_weights)
        blocks = kernel_blocks(self.layout, self.num_features, kernel)
        if self.curvature == "fisher":
            logger.info("curvature='fisher': finalize has nothing to save (score solves each "
                        "layer's Fisher from the stored rows)")
            return
        models = self.store.metadata["models"]
        ids = sorted(int(i) for i in models) if model_ids is None else \
            [_check_model_id(i) for i in model_ids]
        if not ids:
            raise ValueError("no featurized checkpoints to finalize; call featurize() first")
        key = f"{kernel}/{scoring.kernel_weights}"
        distributed.agree("finalize", {"model_ids": ids, "key": key})
        with distributed.step("finalize: checking the train examples"):
            if distributed.is_main():
                check_same_train_examples(self.store, ids)
        for model_id in ids:
            entry = models.get(str(model_id))
            if entry is None or not entry["featurized"]:
                raise ValueError(f"model_id {model_id} is not fully featurized; call "
                                 "featurize() for it (again, to resume) first")
            if key in (entry.get("kernels") or {}):
                continue
            features, out_to_loss = self.store.read_train_arrays(model_id)
            weights = kernel_row_weights(scoring.kernel_weights, out_to_loss)
            with distributed.step(f"finalize model_id {model_id}"):
                if distributed.active():     # rows split over ranks, parts summed
                    kernels = distributed.reduced_kernels(features, blocks, weights=weights,
                                                          device=self.device,
                                                          where=f"model_id {model_id}")
                else:
                    kernels = compute_kernels(features, blocks, device=self.device,
                                              where=f"model_id {model_id}", weights=weights)
                if distributed.is_main():
                    self.store.save_kernels(model_id, key, kernels)

    # ---- targets and scores -----------------------------------------------------------------

    def featurize_targets(self, name: str, checkpoint: Mapping[str, torch.Tensor],
                          targets: Iterable[Batch], *, model_id: int,
                          overwrite: bool = False, optimizer_state: Any = None) -> None:
        """Computes and saves the target features ``[t, k]`` of experiment ``name`` for a
        checkpoint (with the ``optimizer_state`` its train rows were featurized with, if any)."""
        name = check_name(name)
        model_id = _check_model_id(model_id)
        entry = self.store.model_entry(model_id)
        if entry is None:
            raise ValueError(f"model_id {model_id} has no train features; featurize it first")
        if entry["checkpoint"] != checkpoint_fingerprint(checkpoint):
            raise ValueError(f"this is not the checkpoint model_id {model_id} was featurized with")
        featurizer, targets = self._checked(checkpoint, model_id, targets, f"targets {name!r}",
                                            optimizer_state=optimizer_state)
        if moments_fingerprint(featurizer.moments) != entry.get("second_moments"):
            raise ValueError(f"model_id {model_id}'s train rows were featurized "
                             f"{'with another' if entry.get('second_moments') else 'without an'} "
                             "optimizer_state: pass the same to featurize_targets")
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is not None and str(model_id) in experiment["targets"] and not overwrite:
            raise ValueError(f"experiment {name!r} already has target features for model_id "
                             f"{model_id}; pass overwrite=True to replace them")
        recorded = self.store.target_examples_path(name)
        reference = np.load(recorded) if experiment is not None and recorded.exists() else None
        ledger = Ledger(f"targets {name!r}", reference,
                        against=f"the targets experiment {name!r} was created with "
                        "(use a new experiment name for other targets)")
        what = f"targets {name!r}"
        if distributed.active():     # batch b by rank b % W, gathered on every rank
            distributed.agree(f"featurize_targets({name!r})",
                              {"model_id": model_id, "overwrite": overwrite})
            phi = distributed.featurize_shares(featurizer, targets, what=what, out_to_loss=False,
                                               before_batch=ledger)[0]
        else:
            phi = featurize_with(featurizer, targets, what=what, out_to_loss=False,
                                 before_batch=ledger, progress=self.progress).phi
        if experiment is not None and experiment["num_targets"] != phi.shape[0]:
            raise ValueError(f"experiment {name!r} has {experiment['num_targets']} targets, these "
                             f"batches hold {phi.shape[0]}; every checkpoint must see the same targets")
        self.store.experiment_dir(name).mkdir(exist_ok=True)

        def record(metadata: Dict[str, Any]) -> None:
            experiment = metadata["experiments"].get(name)
            if experiment is None:       # checked again: another job may have created it
                experiment = {"num_targets": phi.shape[0], "targets": {}, "scores": None}
                metadata["experiments"][name] = experiment
                save_array_atomic(recorded, ledger.hashes)
            elif experiment["num_targets"] != phi.shape[0]:
                raise ValueError(f"experiment {name!r} has {experiment['num_targets']} targets, "
                                 f"these batches hold {phi.shape[0]}")
            elif reference is None:      # another job created it meanwhile: compare with its targets
                check_rows(ledger.hashes, np.load(recorded), where=f"targets {name!r}",
                           first_row=0, against=f"the targets experiment {name!r} was created with")
            # Written under the lock, so the file and its metadata entry change together.
            save_array_atomic(self.store.targets_path(name, model_id), phi.float().numpy())
            experiment["targets"][str(model_id)] = entry["checkpoint"]
            experiment["scores"] = None      # any earlier scores no longer match the targets
            # Lets a score() running meanwhile notice that its inputs changed.
            experiment["revision"] = experiment.get("revision", 0) + 1
        with distributed.step(f"featurize_targets({name!r}): recording them"):
            if distributed.is_main():
                self.store.update(record)

    def score(self, name: str, *, model_ids: Optional[Sequence[int]] = None,
              scoring: Optional[ScoreSettings] = None, overwrite: bool = False,
              **options: Any) -> np.ndarray:
        """The ensemble's scores ``[n, t]`` for experiment ``name``, saved to the store.

        ``tau = mean_m(S_m) * mean_m(Q_m)`` over ``model_ids`` (default: every checkpoint with
        target features for ``name``); ``scoring`` (:class:`~trak_fast.ScoreSettings`) or its
        fields as keywords (``lambda_reg=``, ``ensemble=``, ``kernel=``, ``kernel_weights=``).
        A (kernel, kernel_weights) pair that was not finalized is computed from the stored
        features, one pass over them per checkpoint.
        Returns a read-only memmap of ``experiment_<name>/scores.npy``.
        """
        scoring = self._score_settings(scoring, options)
        name = check_name(name)
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is None:
            raise ValueError(f"no experiment {name!r}; call featurize_targets({name!r}, ...) first")
        scoring.check_features(self.settings)
        kernel_blocks(self.layout, self.num_features, scoring.kernel)     # a layout for it?
        ids = [int(i) for i in experiment["targets"]] if model_ids is None else \
            [_check_model_id(i) for i in model_ids]
        missing = [i for i in ids if str(i) not in experiment["targets"]]
        if not ids or missing:
            raise ValueError(f"experiment {name!r} has no target features for model_ids "
                             f"{missing or ids}; call featurize_targets for them first")
        if experiment["scores"] is not None and not overwrite:
            raise ValueError(f"experiment {name!r} already has scores; load them with "
                             "load_scores(name) or pass overwrite=True")
        n, t = self.train_size, experiment["num_targets"]
        distributed.agree(f"score({name!r})", {"model_ids": ids, **vars(scoring),
                                               "overwrite": overwrite,
                                               "revision": experiment.get("revision")})
        # Under a process group rank 0 creates the file and rank r fills target columns
        # distributed.share(t) of it (every rank reads the kernels itself).
        final = self.store.scores_path(name)
        tmp = distributed.broadcast(temp_path(final), "score: the scores file")
        try:
            with distributed.step(f"score({name!r})"):
                if distributed.is_main():
                    np.lib.format.open_memmap(tmp, mode="w+", dtype="float32", shape=(n, t)).flush()
            with distributed.step(f"score({name!r})"):
                self._score_columns(tmp, name, ids, scoring)

            def record(metadata: Dict[str, Any]) -> None:
                current = metadata["experiments"][name]
                if current.get("revision") != experiment.get("revision"):
                    raise RuntimeError(f"the target features of experiment {name!r} changed "
                                       "while it was being scored; call score() again")
                # Under the lock, so scores.npy and its metadata entry change together.
                os.replace(tmp, final)
                current["scores"] = {**vars(scoring), "model_ids": ids}
            with distributed.step(f"score({name!r}): recording the scores"):
                if distributed.is_main():
                    self.store.update(record)
        finally:
            if distributed.is_main():
                tmp.unlink(missing_ok=True)      # an error or Ctrl-C leaves no half-written scores
        return self.load_scores(name)

    def _score_settings(self, scoring: Optional[ScoreSettings], options: Dict[str, Any]
                        ) -> ScoreSettings:
        """The scoring of :meth:`score`: the task's preferences where they match the store's
        curvature, then ``scoring`` and ``options``; a curvature other than the store's raises."""
        given = score_settings(options, scoring, where="TRAK.score()")    # checks the keywords
        if scoring is None and not any(k in options for k in ESTIMATOR_FIELDS):
            prefs = self.task.preferred_scoring(self.settings)
            if prefs.get("curvature", "kernel") != self.curvature:
                prefs = {"curvature": self.curvature}
            given = score_settings({**prefs, **options}, where="TRAK.score()")
        scoring = given
        if scoring.curvature != self.curvature:
            raise ValueError(f"this store holds the train rows of curvature={self.curvature!r} "
                             f"(TRAK(curvature=...) when it was created); got "
                             f"curvature={scoring.curvature!r}. Use a store created with "
                             f"curvature={scoring.curvature!r} for those scores.")
        return scoring

    def _score_columns(self, path: Any, name: str, ids: Sequence[int], scoring: ScoreSettings) -> None:
        score_columns(self.store, path, name, ids, scoring, layout=self.layout,
                      proj_dim=self.proj_dim, num_grad_params=self.num_grad_params,
                      device=self.device, progress=self.progress and distributed.is_main())

    def load_scores(self, name: str) -> np.ndarray:
        """The saved scores of experiment ``name`` (read-only memmap ``[n, t]``)."""
        experiment = self.store.metadata["experiments"].get(check_name(name))
        if experiment is None or experiment["scores"] is None:
            raise ValueError(f"experiment {name!r} has no scores; call score({name!r}) first")
        return np.load(self.store.scores_path(name), mmap_mode="r")

    def top_k(self, name: str, k: int, *, block_rows: Optional[int] = None) -> TopK:
        """The ``k`` strongest proponents and opponents of each target of experiment ``name``.

        Reads the saved scores (:meth:`score` first) in blocks of rows, one pass, keeping a
        running top-``k`` per target: memory ``O(t * (k + block_rows))``, independent of the
        number of train rows. Returns :class:`~trak_fast.scoring.TopK`, ``[t, k]`` tensors:
        ``proponents[j]`` the train indices with the largest scores for target ``j`` (best
        first), ``opponents[j]`` those with the smallest, and their scores.
        """
        return top_k(self.load_scores(name), k, block_rows=block_rows)

    @property
    def model_ids(self) -> List[int]:
        """Checkpoints with train features in the store now (finished or not, any job's)."""
        return sorted(int(i) for i in self.store.metadata["models"])

    def status(self) -> Dict[str, Any]:
        """The store's metadata as on disk now: settings, per-model and per-experiment state."""
        return self.store.metadata
