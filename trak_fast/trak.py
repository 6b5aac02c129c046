"""``TRAK``: the estimator for real workloads, backed by a resumable on-disk store.

The steps mirror MadryLab's ``TRAKer``::

    trak = TRAK("results/", model, train_size=len(train_set), proj_dim=2048)
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train_loader, model_id=model_id)    # Phi_m, Q_m  (resumable)
    trak.finalize()                                                     # K_m = Phi_m^T Phi_m
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("val", checkpoint, val_loader, model_id=model_id)
    scores = trak.score("val")                                          # [n, t], saved

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
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .featurize import (DEFAULT_GRAD_MEMORY, Batch, Device, Featurizer, _batches, _check_grad_memory,
                        _check_proj_dim, _check_same_shapes,
                        _loader_length, featurize, grad_param_names, model_device, num_grad_params)
from .kernel import Kernel, check_kernel, compute_kernel, kernel_matrix
from .projection import _MAX_SEED, _check_int, _check_kind, _check_nnz
from .score import damping, finish_ensemble, model_scores, trak_feature_scale
from .store import Store, check_name, save_array_atomic, temp_path
from .tasks import Task, get_task

logger = logging.getLogger("trak_fast")

FEATURE_DTYPES = ("float32", "float16")


def checkpoint_fingerprint(checkpoint: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state_dict's names, shapes, dtypes and bytes (to catch a swapped checkpoint)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(checkpoint):
        tensor = checkpoint[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
        task: ``"classification"``, ``"regression"`` or a :class:`~trak_fast.Task`.
        proj_dim: ``k``; ``None`` stores raw gradients (small models only).
        kind, seed: the projection; checkpoint ``m`` uses ``model_seed(seed, m)``.
        grad_wrt: parameter names to differentiate (``None``: all).
        feature_dtype: ``"float32"`` or ``"float16"`` (half the disk; scores then carry
            float16 rounding of the features, about 1e-3 relative).
        device: where to compute (``None``: the model's device).
        grad_memory: bytes for one group of per-example gradients.
        progress: tqdm progress bars (``False``: quiet).

    ``proj_dim``, ``kind``, ``seed``, ``grad_wrt``, ``feature_dtype``, ``train_size``, the task's
    name and the number of differentiated parameters are recorded; reopening the store with
    other values raises :class:`~trak_fast.store.StoreMismatchError`.
    """

    def __init__(self, save_dir: Union[str, os.PathLike], model: torch.nn.Module, *,
                 train_size: int, task: Union[str, Task] = "classification",
                 proj_dim: Optional[int] = 2048, kind: str = "rademacher", seed: int = 0,
                 grad_wrt: Optional[Sequence[str]] = None, feature_dtype: str = "float32",
                 device: Optional[Device] = None, grad_memory: int = DEFAULT_GRAD_MEMORY,
                 progress: bool = True, nnz: int = 4):
        # Every setting is validated before the store is opened: the store records them on
        # creation, and a bad value written there would make the corrected call a mismatch.
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be a positive int, got {train_size!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        _check_proj_dim(proj_dim)
        kind_id = _check_kind(kind)
        if proj_dim is not None:
            _check_nnz(nnz, kind_id, proj_dim)
        _check_int("seed", seed, 0, _MAX_SEED)
        _check_grad_memory(grad_memory)
        self.model = model
        self.task = get_task(task)
        self.proj_dim = proj_dim
        self.kind = kind
        self.nnz = nnz
        self.seed = seed
        self.grad_wrt = None if grad_wrt is None else grad_param_names(model, grad_wrt)
        self.feature_dtype = feature_dtype
        self.device = torch.device(device) if device is not None else model_device(model)
        self.grad_memory = grad_memory
        self.progress = progress
        self.num_grad_params = num_grad_params(model, self.grad_wrt)
        settings = {
            "train_size": train_size, "proj_dim": proj_dim, "kind": kind, "seed": seed,
            "grad_wrt": self.grad_wrt, "feature_dtype": feature_dtype, "task": self.task.name,
            "num_grad_params": self.num_grad_params,
            "num_features": proj_dim if proj_dim is not None else self.num_grad_params,
        }
        if kind == "sparse":  # recorded only for sparse, so dense stores keep their settings
            settings["nnz"] = nnz
        self.store = Store(save_dir, settings)
        self.train_size = train_size
        self.num_features = settings["num_features"]

    # ---- train features ---------------------------------------------------------------------

    def _featurizer(self, checkpoint: Mapping[str, torch.Tensor], model_id: int) -> Featurizer:
        return Featurizer(self.model, checkpoint, task=self.task, proj_dim=self.proj_dim,
                          kind=self.kind, seed=self.seed, model_id=model_id, nnz=self.nnz,
                          grad_wrt=self.grad_wrt, device=self.device, grad_memory=self.grad_memory)

    def featurize(self, checkpoint: Mapping[str, torch.Tensor], train: Iterable[Batch], *,
                  model_id: int) -> None:
        """Writes ``Phi_m [n, k]`` and ``Q_m [n]`` for checkpoint ``model_id``, batch by batch.

        Resumable: batches whose rows are already finished are read from ``train`` but not
        recomputed, so rerunning after an interruption (Ctrl-C, SIGKILL) completes the store
        with bitwise the same features as one uninterrupted run (same loader, same device,
        same torch thread count: torch's own matmuls in the gradients round differently with
        other thread counts). ``train`` must yield the same ``train_size`` examples in the same
        order every time. Other jobs may featurize other ``model_id``s of the store at the same
        time; a concurrent featurize of this ``model_id`` raises
        :class:`~trak_fast.store.StoreBusyError`.
        """
        model_id = _check_model_id(model_id)
        fingerprint = checkpoint_fingerprint(checkpoint)
        featurizer = self._featurizer(checkpoint, model_id)    # validates the checkpoint
        # Held for the whole run: a second featurizer of this model_id fails fast rather than
        # writing the same rows (and racing on finished.npy) at the same time.
        with self.store.model_lock(model_id):
            def register(metadata: Dict[str, Any]) -> Dict[str, Any]:
                entry = metadata["models"].get(str(model_id))
                if entry is not None and entry["checkpoint"] != fingerprint:
                    raise ValueError(f"model_id {model_id} was featurized with a different "
                                     "checkpoint; use a new model_id or a new save_dir")
                if entry is None:
                    entry = {"checkpoint": fingerprint, "featurized": False, "kernel": None}
                    metadata["models"][str(model_id)] = entry
                return entry

            if self.store.update(register)["featurized"]:
                logger.info("model_id %d is already featurized; nothing to do", model_id)
                return
            self._write_train_features(featurizer, train, model_id)

            def mark_featurized(metadata: Dict[str, Any]) -> None:
                metadata["models"][str(model_id)]["featurized"] = True
            self.store.update(mark_featurized)

    def _write_train_features(self, featurizer: Featurizer, train: Iterable[Batch],
                              model_id: int) -> None:
        """The resumable loop of :meth:`featurize` (the caller holds the model's lock)."""
        features, out_to_loss, finished = self.store.open_train_arrays(model_id, self.feature_dtype)

        n, row, shapes = self.train_size, 0, None
        loader = _batches(train, f"featurizing model {model_id}", self.progress, _loader_length(train))
        for index, batch in enumerate(loader):
            where = f"train batch {index}"
            size = self.task.check_batch(batch, where)
            if self.task.fixed_shapes:
                shapes = _check_same_shapes(batch, shapes, where)
            if row + size > n:
                raise ValueError(f"train yielded more than train_size = {n} examples "
                                 f"({row + size} by batch {index})")
            if finished[row:row + size].all():
                row += size
                continue
            phi, q = featurizer(batch, where=where)
            features[row:row + size] = phi.cpu().numpy()
            out_to_loss[row:row + size] = q.cpu().numpy()
            features.flush()
            out_to_loss.flush()
            finished[row:row + size] = 1       # only after the rows themselves are written
            finished.flush()
            row += size
        if row != n:
            raise ValueError(f"train yielded {row} examples, the store expects train_size = {n}"
                             + (" (an empty loader?)" if row == 0 else ""))

    def finalize(self, model_ids: Optional[Sequence[int]] = None) -> None:
        """Computes and saves each checkpoint's kernel (``Phi^T Phi``, or ``Phi Phi^T`` if k > n).

        ``model_ids=None``: every checkpoint in the store now, including those featurized by
        other jobs since this object was created. Raises ValueError if a checkpoint's train
        features are all zero (see :func:`trak_fast.kernel.check_kernel`).
        """
        models = self.store.metadata["models"]
        ids = sorted(int(i) for i in models) if model_ids is None else \
            [_check_model_id(i) for i in model_ids]
        if not ids:
            raise ValueError("no featurized checkpoints to finalize; call featurize() first")
        for model_id in ids:
            entry = models.get(str(model_id))
            if entry is None or not entry["featurized"]:
                raise ValueError(f"model_id {model_id} is not fully featurized; call "
                                 "featurize() for it (again, to resume) first")
            if entry["kernel"] is not None:
                continue
            features, _ = self.store.read_train_arrays(model_id)
            kernel = check_kernel(compute_kernel(features, device=self.device),
                                  f"model_id {model_id}")
            save_array_atomic(self.store.model_dir(model_id) / "kernel.npy",
                              kernel.matrix.cpu().numpy())

            def record(metadata: Dict[str, Any]) -> None:
                metadata["models"][str(model_id)]["kernel"] = {"form": kernel.form}
            self.store.update(record)

    def _kernel(self, model_id: int, primal: bool) -> Kernel:
        entry = self.store.model_entry(model_id)
        if entry is None or entry["kernel"] is None:
            raise ValueError(f"model_id {model_id} has no kernel; call finalize() first")
        features, _ = self.store.read_train_arrays(model_id)
        if primal and entry["kernel"]["form"] != "primal":
            kernel = Kernel(kernel_matrix(features, device=self.device), "primal", self.train_size)
        else:
            matrix = torch.from_numpy(np.load(self.store.model_dir(model_id) / "kernel.npy"))
            kernel = Kernel(matrix, entry["kernel"]["form"], self.train_size)
        return check_kernel(kernel, f"model_id {model_id}")    # also kernels stored before the check

    # ---- targets and scores -----------------------------------------------------------------

    def featurize_targets(self, name: str, checkpoint: Mapping[str, torch.Tensor],
                          targets: Iterable[Batch], *, model_id: int,
                          overwrite: bool = False) -> None:
        """Computes and saves the target features ``[t, k]`` of experiment ``name`` for a checkpoint."""
        name = check_name(name)
        model_id = _check_model_id(model_id)
        entry = self.store.model_entry(model_id)
        if entry is None:
            raise ValueError(f"model_id {model_id} has no train features; featurize it first")
        if entry["checkpoint"] != checkpoint_fingerprint(checkpoint):
            raise ValueError(f"this is not the checkpoint model_id {model_id} was featurized with")
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is not None and str(model_id) in experiment["targets"] and not overwrite:
            raise ValueError(f"experiment {name!r} already has target features for model_id "
                             f"{model_id}; pass overwrite=True to replace them")
        phi = featurize(self.model, checkpoint, targets, task=self.task, proj_dim=self.proj_dim,
                        kind=self.kind, seed=self.seed, model_id=model_id, nnz=self.nnz,
                        grad_wrt=self.grad_wrt,
                        device=self.device, grad_memory=self.grad_memory, progress=self.progress,
                        out_to_loss=False, what=f"targets {name!r}").phi
        if experiment is not None and experiment["num_targets"] != phi.shape[0]:
            raise ValueError(f"experiment {name!r} has {experiment['num_targets']} targets, these "
                             f"batches hold {phi.shape[0]}; every checkpoint must see the same targets")
        folder = self.store.experiment_dir(name)
        folder.mkdir(exist_ok=True)

        def record(metadata: Dict[str, Any]) -> None:
            experiment = metadata["experiments"].get(name)
            if experiment is None:       # checked again: another job may have created it
                experiment = {"num_targets": phi.shape[0], "targets": {}, "scores": None}
                metadata["experiments"][name] = experiment
            elif experiment["num_targets"] != phi.shape[0]:
                raise ValueError(f"experiment {name!r} has {experiment['num_targets']} targets, "
                                 f"these batches hold {phi.shape[0]}")
            # Written under the lock, so the file and its metadata entry change together.
            save_array_atomic(folder / f"targets_{model_id}.npy", phi.float().numpy())
            experiment["targets"][str(model_id)] = entry["checkpoint"]
            experiment["scores"] = None      # any earlier scores no longer match the targets
            # Lets a score() running meanwhile notice that its inputs changed.
            experiment["revision"] = experiment.get("revision", 0) + 1
        self.store.update(record)

    def score(self, name: str, *, model_ids: Optional[Sequence[int]] = None,
              lambda_reg: Optional[float] = None, relative_lambda: Optional[bool] = None,
              ensemble: str = "mean", overwrite: bool = False) -> np.ndarray:
        """The ensemble's scores ``[n, t]`` for experiment ``name``, saved to the store.

        ``tau = mean_m(S_m) * mean_m(Q_m)`` over ``model_ids`` (default: every checkpoint with
        target features for ``name``); damping and ``ensemble`` as in :func:`trak_fast.attribute`.
        Returns a read-only memmap of ``experiment_<name>/scores.npy``.
        """
        name = check_name(name)
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is None:
            raise ValueError(f"no experiment {name!r}; call featurize_targets({name!r}, ...) first")
        lambda_reg, relative_lambda = damping(ensemble, lambda_reg, relative_lambda)
        ids = [int(i) for i in experiment["targets"]] if model_ids is None else \
            [_check_model_id(i) for i in model_ids]
        missing = [i for i in ids if str(i) not in experiment["targets"]]
        if not ids or missing:
            raise ValueError(f"experiment {name!r} has no target features for model_ids "
                             f"{missing or ids}; call featurize_targets for them first")
        folder = self.store.experiment_dir(name)
        if experiment["scores"] is not None and not overwrite:
            raise ValueError(f"experiment {name!r} already has scores; load them with "
                             "load_scores(name) or pass overwrite=True")
        n, t = self.train_size, experiment["num_targets"]
        tmp = temp_path(folder / "scores.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype="float32", shape=(n, t))
            q_sum = torch.zeros(n, dtype=torch.float64)
            for model_id in ids:
                features, out_to_loss = self.store.read_train_arrays(model_id)
                targets = torch.from_numpy(np.load(folder / f"targets_{model_id}.npy"))
                scale = trak_feature_scale(self.proj_dim, self.num_grad_params) \
                    if ensemble == "trak" else 1.0
                model_scores(features, targets, self._kernel(model_id, primal=ensemble == "trak"),
                             lambda_reg=lambda_reg, relative_lambda=relative_lambda,
                             feature_scale=scale, normalize_inverse=ensemble == "trak", out=out,
                             device=self.device, progress=self.progress)
                q_sum += torch.from_numpy(np.asarray(out_to_loss, dtype=np.float64))
            finish_ensemble(out, q_sum, len(ids))
            out.flush()
            del out

            def record(metadata: Dict[str, Any]) -> None:
                current = metadata["experiments"][name]
                if current.get("revision") != experiment.get("revision"):
                    raise RuntimeError(f"the target features of experiment {name!r} changed "
                                       "while it was being scored; call score() again")
                # Under the lock, so scores.npy and its metadata entry change together.
                os.replace(tmp, folder / "scores.npy")
                current["scores"] = {"ensemble": ensemble, "lambda_reg": lambda_reg,
                                     "relative_lambda": relative_lambda, "model_ids": ids}
            self.store.update(record)
        finally:
            tmp.unlink(missing_ok=True)      # an error or Ctrl-C leaves no half-written scores
        return self.load_scores(name)

    def load_scores(self, name: str) -> np.ndarray:
        """The saved scores of experiment ``name`` (read-only memmap ``[n, t]``)."""
        experiment = self.store.metadata["experiments"].get(check_name(name))
        if experiment is None or experiment["scores"] is None:
            raise ValueError(f"experiment {name!r} has no scores; call score({name!r}) first")
        return np.load(self.store.experiment_dir(name) / "scores.npy", mmap_mode="r")

    @property
    def model_ids(self) -> List[int]:
        """Checkpoints with train features in the store now (finished or not, any job's)."""
        return sorted(int(i) for i in self.store.metadata["models"])

    def status(self) -> Dict[str, Any]:
        """The store's metadata as on disk now: settings, per-model and per-experiment state."""
        return self.store.metadata
