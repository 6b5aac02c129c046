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
import hashlib
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .featurize import (DEFAULT_GRAD_MEMORY, Batch, Device, Featurizer, FeatureSpec, _batches,
                        _check_grad_memory,
                        _check_proj_dim, _check_same_shapes,
                        _loader_length, featurize, grad_param_names)
from . import checks
from . import distributed
from .fingerprint import Ledger, check_rows, example_hashes, signature
from .kernel import (Kernel, check_kernel, compute_kernels, kernel_blocks, kernel_matrix,
                     kernel_row_weights, resolve_kernel_weights)
from .layout import FeatureBlock, layout_to_json
from .projection import _MAX_SEED, _check_int, _check_kind, _check_nnz
from .score import block_scores, damping, finish_ensemble, trak_feature_scale
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


class _WrongLength(Exception):
    """The train loader yielded more or fewer than train_size examples."""


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
        gradients, projection, factored_dims: how per-example gradients are computed and
            projected (see :class:`~trak_fast.Featurizer`); ``projection`` and
            ``factored_dims`` are recorded in the store.
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
                 gradients: str = "auto", projection: str = "dense",
                 factored_dims: Optional[Sequence[int]] = None, progress: bool = True,
                 nnz: int = 4):
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
        self.device = distributed.local_device(checks.compute_device(model, device), device)
        self.grad_memory = grad_memory
        self.progress = progress
        spec = FeatureSpec(model, self.task, proj_dim=proj_dim, grad_wrt=grad_wrt,
                           gradients=gradients, projection=projection, factored_dims=factored_dims)
        self.gradients = gradients
        self.projection = projection
        self.factored_dims = spec.factored_dims
        self.num_grad_params = spec.num_grad_params
        settings = {
            "train_size": train_size, "proj_dim": spec.proj_dim, "kind": kind, "seed": seed,
            "grad_wrt": self.grad_wrt, "feature_dtype": feature_dtype, "task": self.task.name,
            "num_grad_params": self.num_grad_params, "num_features": spec.num_features,
            "projection": projection,
            "factored_dims": None if spec.factored_dims is None else list(spec.factored_dims),
            "layout": layout_to_json(spec.layout),
        }
        if kind == "sparse":  # recorded only for sparse, so dense stores keep their settings
            settings["nnz"] = nnz
        self.layout = spec.layout
        self.store = self._open_store(save_dir, settings)
        self.train_size = train_size
        self.num_features = settings["num_features"]

    @staticmethod
    def _open_store(save_dir: Union[str, os.PathLike], settings: Dict[str, Any]) -> Store:
        """The store; under a process group rank 0 opens (or creates) it first, then the others
        check that they see the same directory (a token rank 0 wrote there)."""
        if not distributed.active():
            return Store(save_dir, settings)
        distributed.agree("TRAK settings", settings)
        store = token = None
        with distributed.step(f"opening the store {str(save_dir)!r}"):
            if distributed.is_main():
                store = Store(save_dir, settings)
                token = f"{os.getpid()}-{os.urandom(8).hex()}"
                save_array_atomic(store.path / ".ranks_token.npy", np.frombuffer(token.encode(), np.uint8))
        token = distributed.broadcast(token, "opening the store")
        with distributed.step(f"opening the store {str(save_dir)!r}"):
            if not distributed.is_main():
                store = Store(save_dir, settings)
                path = store.path / ".ranks_token.npy"
                seen = np.load(path).tobytes().decode() if path.exists() else None
                if seen != token:
                    raise ValueError(
                        f"save_dir {str(save_dir)!r} on rank {distributed.rank()} is not the "
                        "directory rank 0 opened: the store must be on a file system that every "
                        "rank shares (the same path on every machine)")
        return store

    # ---- train features ---------------------------------------------------------------------

    def _featurizer(self, checkpoint: Mapping[str, torch.Tensor], model_id: int) -> Featurizer:
        return Featurizer(self.model, checkpoint, task=self.task, proj_dim=self.proj_dim,
                          kind=self.kind, seed=self.seed, model_id=model_id, nnz=self.nnz,
                          grad_wrt=self.grad_wrt, device=self.device, grad_memory=self.grad_memory,
                          **self._gradient_settings())

    def _gradient_settings(self) -> Dict[str, Any]:
        return dict(gradients=self.gradients, projection=self.projection,
                    factored_dims=self.factored_dims)

    def featurize(self, checkpoint: Mapping[str, torch.Tensor], train: Iterable[Batch], *,
                  model_id: int) -> None:
        """Writes ``Phi_m [n, k]`` and ``Q_m [n]`` for checkpoint ``model_id``, batch by batch.

        Resumable: batches whose rows are already finished are read from ``train`` but not
        recomputed, so rerunning after an interruption (Ctrl-C, SIGKILL) completes the store
        with bitwise the same features as one uninterrupted run (same loader, same device,
        same torch thread count: torch's own matmuls in the gradients round differently with
        other thread counts). ``train`` must yield the same ``train_size`` examples in the same
        order every time, and as every other checkpoint of the store: each example is
        fingerprinted, and a mismatch raises
        :class:`~trak_fast.fingerprint.ExampleMismatchError` before the batch is computed.
        Cheap mistakes are caught before any work (:mod:`trak_fast.checks`). Other jobs may featurize other ``model_id``s of the store at the same
        time; a concurrent featurize of this ``model_id`` raises
        :class:`~trak_fast.store.StoreBusyError`. Under a process group, rank ``r`` of ``W``
        computes and writes the batches ``b`` with ``b % W == r`` (rank 0 holds the lock for
        the job); a resume may use another world size.
        """
        with distributed.step("featurize: checking the arguments"):
            model_id = _check_model_id(model_id)
            checks.check_checkpoint(self.model, checkpoint, f"checkpoint {model_id}")
            train = checks.prepare_loader(train, "train", model=self.model,
                                          run=checks.model_fn(self.model, checkpoint, self.device),
                                          task=self.task, device=self.device, passes=1,
                                          expected=self.train_size)
        fingerprint = checkpoint_fingerprint(checkpoint)
        featurizer = self._featurizer(checkpoint, model_id)
        distributed.agree(f"featurize(model_id={model_id})",
                          {"model_id": model_id, "checkpoint": fingerprint})

        def register(metadata: Dict[str, Any]) -> Dict[str, Any]:
            entry = metadata["models"].get(str(model_id))
            if entry is not None and entry["checkpoint"] != fingerprint:
                raise ValueError(f"model_id {model_id} was featurized with a different "
                                 "checkpoint; use a new model_id or a new save_dir")
            if entry is None:
                entry = {"checkpoint": fingerprint, "featurized": False, "kernels": {}}
                metadata["models"][str(model_id)] = entry
            return entry

        def mark_featurized(metadata: Dict[str, Any]) -> None:
            metadata["models"][str(model_id)]["featurized"] = True

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
                self._write_train_features(featurizer, train, model_id)
            with distributed.step(f"featurize model_id {model_id}: recording it"):
                if distributed.is_main():
                    self.store.update(mark_featurized)

    def _write_train_features(self, featurizer: Featurizer, train: Iterable[Batch],
                              model_id: int) -> None:
        """The resumable loop of :meth:`featurize` (the caller holds the model's lock).

        Every batch is fingerprinted (:mod:`trak_fast.fingerprint`) before any work and
        compared with the finished rows it covers (a resume) and with the finished rows of
        every other checkpoint; its hashes are written before its ``finished`` marks. If the
        loader turns out to yield more or fewer than ``train_size`` examples, the rows this
        call wrote are un-marked: which examples they hold is unknown.
        """
        features, out_to_loss, finished, examples = self.store.open_train_arrays(
            model_id, self.feature_dtype)
        own = np.array(examples)
        own[np.asarray(finished) == 0] = 0
        reference_id, reference = self._reference_examples(exclude=model_id)
        start_over = (f"To featurize model_id {model_id} from scratch, delete "
                      f"{str(self.store.model_dir(model_id))!r} and call featurize again "
                      "(or use a new save_dir).")

        n, row, shapes = self.train_size, 0, None
        written: List[Tuple[int, int]] = []      # row ranges this call marked finished
        loader = _batches(train, f"featurizing model {model_id}", self.progress, _loader_length(train))
        try:
            for index, batch in enumerate(loader):
                where = f"train batch {index}"
                size = self.task.check_batch(batch, where)
                if self.task.fixed_shapes:
                    shapes = _check_same_shapes(batch, shapes, where)
                if row + size > n:
                    raise _WrongLength(f"train yielded more than train_size = {n} examples "
                                       f"({row + size} by batch {index})")
                if not distributed.owns(index):     # another rank's batch (b -> rank b % W)
                    row += size
                    continue
                hashes = example_hashes(batch, where)
                now = signature(batch)
                check_rows(hashes, own[row:row + size], where=where, first_row=row,
                           against=f"the rows an earlier featurize of model_id {model_id} "
                           "wrote (resume)", reference=own, start_over=start_over, now=now)
                if reference is not None:
                    check_rows(hashes, reference[row:row + size], where=where, first_row=row,
                               against=f"the train examples of model_id {reference_id}",
                               reference=reference, now=now, start_over="Every checkpoint must "
                               "see the train examples in the order of the first one.")
                if finished[row:row + size].all():
                    row += size
                    continue
                phi, q = featurizer(batch, where=where)
                features[row:row + size] = phi.cpu().numpy()
                out_to_loss[row:row + size] = q.cpu().numpy()
                features.flush()
                out_to_loss.flush()
                examples[row:row + size] = hashes
                examples.flush()
                written.append((row, row + size))
                finished[row:row + size] = 1       # only after the rows themselves are written
                finished.flush()
                row += size
            if row != n:
                raise _WrongLength(f"train yielded {row} examples, the store expects train_size = {n}"
                                   + (" (an empty loader?)" if row == 0 else ""))
        except _WrongLength as exc:
            for start, stop in written:         # marks first: a finished row always has its hash
                finished[start:stop] = 0
            finished.flush()
            for start, stop in written:
                examples[start:stop] = 0
            examples.flush()
            kept = " The rows written by this call are not kept." if written else ""
            raise ValueError(f"{exc}.{kept}") from None

    def finalize(self, model_ids: Optional[Sequence[int]] = None, *, kernel: str = "full",
                 kernel_weights: Optional[str] = None) -> None:
        """Computes and saves each checkpoint's kernel (``Phi^T W Phi``, or the Gram matrix
        ``Phi Phi^T`` if k > n, the weights then applied when solving).

        ``kernel="per_layer"`` saves the block diagonal instead, one kernel per layer of the
        feature layout; ``kernel_weights`` as in :func:`trak_fast.attribute` (default
        ``DEFAULT_KERNEL_WEIGHTS``). Each (kernel, kernel_weights) pair is saved separately
        (``model_<id>/kernel_<kernel>_<weights>_<i>.npy``), so several can be finalized and
        :meth:`score` chooses. ``model_ids=None``: every checkpoint in the store now, including
        those featurized by other jobs since this object was created. Raises ValueError if a
        checkpoint's train features are all zero (see :func:`trak_fast.kernel.check_kernel`).
        """
        kernel_weights = resolve_kernel_weights(kernel_weights, "mean")
        blocks = kernel_blocks(self.layout, self.num_features, kernel)
        models = self.store.metadata["models"]
        ids = sorted(int(i) for i in models) if model_ids is None else \
            [_check_model_id(i) for i in model_ids]
        if not ids:
            raise ValueError("no featurized checkpoints to finalize; call featurize() first")
        distributed.agree("finalize", {"model_ids": ids, "kernel": kernel,
                                       "kernel_weights": kernel_weights})
        with distributed.step("finalize: checking the train examples"):
            if distributed.is_main():
                self._check_same_train_examples(ids)
        key = f"{kernel}/{kernel_weights}"
        for model_id in ids:
            entry = models.get(str(model_id))
            if entry is None or not entry["featurized"]:
                raise ValueError(f"model_id {model_id} is not fully featurized; call "
                                 "featurize() for it (again, to resume) first")
            if key in (entry.get("kernels") or {}):
                continue
            features, out_to_loss = self.store.read_train_arrays(model_id)
            weights = kernel_row_weights(kernel_weights, out_to_loss)
            if distributed.active():     # rows split over ranks, parts summed; rank 0 writes
                with distributed.step(f"finalize model_id {model_id}"):
                    kernels = distributed.reduced_kernels(features, blocks, weights=weights,
                                                          device=self.device,
                                                          where=f"model_id {model_id}")
                    if kernels is not None:
                        self._save_kernels(model_id, kernel, kernel_weights, kernels)
            else:
                kernels = compute_kernels(features, blocks, device=self.device,
                                          where=f"model_id {model_id}", weights=weights)
                self._save_kernels(model_id, kernel, kernel_weights, kernels)

    def _save_kernels(self, model_id: int, kernel: str, kernel_weights: str,
                      kernels: List[Any]) -> None:
        """Writes ``[(block, Kernel)]`` and records them in the metadata (one update)."""
        key = f"{kernel}/{kernel_weights}"
        folder = self.store.model_dir(model_id)
        value = []
        for i, (block, k) in enumerate(kernels):
            name = f"kernel_{kernel}_{kernel_weights}_{i}.npy"
            save_array_atomic(folder / name, k.matrix.cpu().numpy())
            value.append({"layer": block.layer, "start": block.start, "stop": block.stop,
                          "form": k.form, "file": name})

        def record(metadata: Dict[str, Any]) -> None:
            metadata["models"][str(model_id)].setdefault("kernels", {})[key] = value
        self.store.update(record)

    def _reference_examples(self, exclude: Optional[int] = None
                            ) -> Tuple[Optional[int], Optional[np.ndarray]]:
        """``(model_id, hashes [n, 2])`` every checkpoint's train rows are compared with: the
        lowest fully featurized model_id, else the lowest with any rows (``None`` if none).

        One reference, not all checkpoints: each is checked against it, which makes all of
        them agree, and memory stays ``16 n`` bytes however many checkpoints there are.
        """
        models = self.store.metadata["models"]
        ids = sorted((not entry["featurized"], int(i)) for i, entry in models.items()
                     if int(i) != exclude)
        for _, model_id in ids:
            hashes = self.store.read_train_examples(model_id)
            if hashes is not None and hashes[:, 1].any():
                return model_id, hashes
        return None, None

    def _check_same_train_examples(self, ids: Sequence[int]) -> None:
        """All checkpoints' train rows hold the same examples (jobs that ran at the same time
        could only check each other's rows finished by then)."""
        reference_id, reference = self._reference_examples()
        if reference is None:
            return
        for model_id in ids:
            hashes = None if model_id == reference_id else self.store.read_train_examples(model_id)
            if hashes is not None:
                check_rows(hashes, reference, where=f"the train rows of model_id {model_id}",
                           first_row=0, against=f"those of model_id {reference_id}",
                           start_over="Featurize one of them again from scratch (delete its "
                           "model_<id> folder) with the loader of the other.")

    def _stored_kernels(self, model_id: int, kernel: str, kernel_weights: str,
                        primal: bool = False) -> List[Any]:
        """``[(block, Kernel)]`` saved by ``finalize(kernel=..., kernel_weights=...)``, or
        computed from the stored features (one pass) when that pair was not finalized.

        ``primal=True`` (trak's ensemble) recomputes a dual kernel in the primal form.
        """
        entry = self.store.model_entry(model_id)
        stored = None if entry is None else (entry.get("kernels") or {}).get(f"{kernel}/{kernel_weights}")
        features, out_to_loss = self.store.read_train_arrays(model_id)
        weights = kernel_row_weights(kernel_weights, out_to_loss)
        if stored is None:
            logger.info("model_id %d: computing kernel=%r, kernel_weights=%r from the stored "
                        "features (finalize(kernel=..., kernel_weights=...) would save it)",
                        model_id, kernel, kernel_weights)
            return compute_kernels(features, kernel_blocks(self.layout, self.num_features, kernel),
                                   form="primal" if primal else "auto", device=self.device,
                                   where=f"model_id {model_id}", weights=weights)
        folder = self.store.model_dir(model_id)
        out = []
        for b in stored:
            block = FeatureBlock(b["layer"], b["start"], b["stop"], b["layer"])
            if primal and b["form"] != "primal":
                matrix = kernel_matrix(features[:, b["start"]:b["stop"]], device=self.device)
                k = Kernel(matrix, "primal", self.train_size)
            else:
                matrix = torch.from_numpy(np.load(folder / b["file"]))
                k = Kernel(matrix, b["form"], self.train_size, weights)
            out.append((block, check_kernel(k, f"model_id {model_id}")))
        return out

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
        targets = checks.prepare_loader(targets, f"targets {name!r}", model=self.model,
                                        run=checks.model_fn(self.model, checkpoint, self.device),
                                        task=self.task, device=self.device, passes=1)
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is not None and str(model_id) in experiment["targets"] and not overwrite:
            raise ValueError(f"experiment {name!r} already has target features for model_id "
                             f"{model_id}; pass overwrite=True to replace them")
        folder = self.store.experiment_dir(name)
        recorded = folder / "examples.npy"
        reference = np.load(recorded) if experiment is not None and recorded.exists() else None
        ledger = Ledger(f"targets {name!r}", reference,
                        against=f"the targets experiment {name!r} was created with "
                        "(use a new experiment name for other targets)")
        if distributed.active():     # batch b by rank b % W, gathered on every rank
            distributed.agree(f"featurize_targets({name!r})",
                              {"model_id": model_id, "overwrite": overwrite})
            phi = distributed.featurize_shares(
                self._featurizer(checkpoint, model_id), targets, task=self.task,
                what=f"targets {name!r}", out_to_loss=False, before_batch=ledger)[0]
        else:
            phi = featurize(self.model, checkpoint, targets, task=self.task,
                            proj_dim=self.proj_dim, kind=self.kind, seed=self.seed,
                            model_id=model_id, nnz=self.nnz, grad_wrt=self.grad_wrt,
                            device=self.device, grad_memory=self.grad_memory,
                            progress=self.progress, out_to_loss=False,
                            what=f"targets {name!r}", before_batch=ledger,
                            **self._gradient_settings()).phi
        if experiment is not None and experiment["num_targets"] != phi.shape[0]:
            raise ValueError(f"experiment {name!r} has {experiment['num_targets']} targets, these "
                             f"batches hold {phi.shape[0]}; every checkpoint must see the same targets")
        folder.mkdir(exist_ok=True)

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
            save_array_atomic(folder / f"targets_{model_id}.npy", phi.float().numpy())
            experiment["targets"][str(model_id)] = entry["checkpoint"]
            experiment["scores"] = None      # any earlier scores no longer match the targets
            # Lets a score() running meanwhile notice that its inputs changed.
            experiment["revision"] = experiment.get("revision", 0) + 1
        with distributed.step(f"featurize_targets({name!r}): recording them"):
            if distributed.is_main():
                self.store.update(record)

    def score(self, name: str, *, model_ids: Optional[Sequence[int]] = None,
              lambda_reg: Optional[float] = None, relative_lambda: Optional[bool] = None,
              ensemble: str = "mean", kernel: str = "full", kernel_weights: Optional[str] = None,
              overwrite: bool = False) -> np.ndarray:
        """The ensemble's scores ``[n, t]`` for experiment ``name``, saved to the store.

        ``tau = mean_m(S_m) * mean_m(Q_m)`` over ``model_ids`` (default: every checkpoint with
        target features for ``name``); damping, ``ensemble``, ``kernel`` and ``kernel_weights`` as
        in :func:`trak_fast.attribute` (``ensemble="trak"`` uses ``kernel_weights="none"``). A
        (kernel, kernel_weights) pair that was not finalized is computed from the stored
        features, one pass over them per checkpoint.
        Returns a read-only memmap of ``experiment_<name>/scores.npy``.
        """
        name = check_name(name)
        experiment = self.store.metadata["experiments"].get(name)
        if experiment is None:
            raise ValueError(f"no experiment {name!r}; call featurize_targets({name!r}, ...) first")
        lambda_reg, relative_lambda = damping(ensemble, lambda_reg, relative_lambda)
        kernel_weights = resolve_kernel_weights(kernel_weights, ensemble)
        kernel_blocks(self.layout, self.num_features, kernel)                 # validates kernel
        if ensemble == "trak" and (self.projection != "dense" or kernel != "full"
                                   or kernel_weights != "none"):
            raise ValueError("ensemble='trak' reproduces MadryLab trak's dense projection and "
                             f"full kernel; got projection={self.projection!r}, kernel={kernel!r}")
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
        distributed.agree(f"score({name!r})", {
            "model_ids": ids, "lambda_reg": lambda_reg, "relative_lambda": relative_lambda,
            "ensemble": ensemble, "kernel": kernel, "kernel_weights": kernel_weights,
            "overwrite": overwrite, "revision": experiment.get("revision")})
        # Under a process group rank 0 creates the file and rank r fills target columns
        # distributed.share(t) of it (every rank reads the kernels itself).
        tmp = distributed.broadcast(temp_path(folder / "scores.npy"), "score: the scores file")
        try:
            with distributed.step(f"score({name!r})"):
                if distributed.is_main():
                    np.lib.format.open_memmap(tmp, mode="w+", dtype="float32", shape=(n, t)).flush()
            with distributed.step(f"score({name!r})"):
                self._score_columns(tmp, ids, folder, lambda_reg=lambda_reg,
                                    relative_lambda=relative_lambda, ensemble=ensemble,
                                    kernel=kernel, kernel_weights=kernel_weights)

            def record(metadata: Dict[str, Any]) -> None:
                current = metadata["experiments"][name]
                if current.get("revision") != experiment.get("revision"):
                    raise RuntimeError(f"the target features of experiment {name!r} changed "
                                       "while it was being scored; call score() again")
                # Under the lock, so scores.npy and its metadata entry change together.
                os.replace(tmp, folder / "scores.npy")
                current["scores"] = {"ensemble": ensemble, "lambda_reg": lambda_reg, "kernel": kernel,
                                     "kernel_weights": kernel_weights,
                                     "relative_lambda": relative_lambda, "model_ids": ids}
            with distributed.step(f"score({name!r}): recording the scores"):
                if distributed.is_main():
                    self.store.update(record)
        finally:
            if distributed.is_main():
                tmp.unlink(missing_ok=True)      # an error or Ctrl-C leaves no half-written scores
        return self.load_scores(name)

    def _score_columns(self, path: Any, ids: Sequence[int], folder: Any, *, lambda_reg: float,
                       relative_lambda: bool, ensemble: str, kernel: str,
                       kernel_weights: str) -> None:
        """Writes this rank's target columns (all of them in one process) of the scores file."""
        out = np.lib.format.open_memmap(path, mode="r+")
        n, t = out.shape
        c0, c1 = distributed.share(t)
        if c0 == c1:
            return
        part = out if (c0, c1) == (0, t) else np.zeros((n, c1 - c0), dtype=np.float32)
        q_sum = torch.zeros(n, dtype=torch.float64)
        for model_id in ids:
            features, out_to_loss = self.store.read_train_arrays(model_id)
            targets = torch.from_numpy(np.load(folder / f"targets_{model_id}.npy")[c0:c1])
            scale = trak_feature_scale(self.proj_dim, self.num_grad_params) \
                if ensemble == "trak" else 1.0
            kernels = self._stored_kernels(model_id, kernel, kernel_weights,
                                           primal=ensemble == "trak")
            block_scores(features, targets, kernels,
                         lambda_reg=lambda_reg, relative_lambda=relative_lambda,
                         feature_scale=scale, normalize_inverse=ensemble == "trak", out=part,
                         device=self.device, progress=self.progress)
            q_sum += torch.from_numpy(np.asarray(out_to_loss, dtype=np.float64))
        finish_ensemble(part, q_sum, len(ids))
        if part is not out:
            out[:, c0:c1] = part
        out.flush()

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
