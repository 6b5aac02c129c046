"""The on-disk store: ``.npy`` memmaps plus one JSON metadata file, safe to share between processes.

Layout of a store directory::

    metadata.json                       settings, per-model and per-experiment state
    .lock                               flock'ed around every read-modify-write of metadata.json
    .lock-model_<id>                    flock'ed while checkpoint <id> is being featurized
    model_<id>/features.npy             [n, k] float32 or float16   (phi_m, row i = train example i;
                                        [n, (1 + C) k] [G | S_1 .. S_C] with curvature
                                        "fisher", C = fisher_chunks, see TRAK)
    model_<id>/out_to_loss.npy          [n] float32                 (Q_m)
    model_<id>/examples.npy             [n, 2] uint64               (fingerprint of train example i)
    model_<id>/finished.npy             [n] uint8                   (1 = row i is written)
    model_<id>/kernel.npy               [k, k] or [n, n] float64    (finalized kernel)
    experiment_<name>/targets_<id>.npy  [t, k] float32              (target features, model id)
    experiment_<name>/examples.npy      [t, 2] uint64               (fingerprint of target j)
    experiment_<name>/scores.npy        [n, t] float32              (the ensemble's scores)

Concurrency. The normal TRAK workflow runs one job per checkpoint, all on one store, so
several processes (or several :class:`Store` objects in one process) may open the same
directory at once. No object keeps a private copy of the metadata: every change goes through
:meth:`Store.update`, which takes an exclusive ``fcntl.flock`` on ``.lock``, re-reads
``metadata.json``, applies only the caller's change and writes the result atomically, so
concurrent jobs never overwrite each other's entries; readers (:attr:`Store.metadata`) always
read the file afresh. Featurizing one checkpoint is exclusive: :meth:`Store.model_lock` holds
``.lock-model_<id>`` for the whole run, and a second featurizer of the same ``model_id``
(another process, or another object in this one) gets :class:`StoreBusyError` at once instead
of interleaving writes into the same rows (it can simply be rerun later: it resumes). The
locks are advisory ``flock`` locks released by the kernel when a process dies, so a killed job
never leaves the store locked; they hold between processes of one machine (``flock`` on
network file systems is not reliable).

Crash safety. ``metadata.json`` is replaced atomically (written to a temporary file, flushed,
renamed), so it is always either the old or the new version. Train rows are written batch by
batch: features and Q first, then (after a flush) the batch's rows in ``finished.npy``, so a
row marked finished is always complete. ``finished.npy`` is created last, after the arrays
it describes; a model directory without it is recreated from scratch. Whole arrays (kernels,
target features, scores) are written to a temporary name ``.<name>.tmp-<pid>...`` and renamed;
temporary files left by processes that no longer exist (a killed ``score``) are deleted when
the store is opened.

Example fingerprints. ``examples.npy`` holds, per row, the ``(structure, content)`` hashes of
:func:`trak_fast.fingerprint.example_hashes` (0 = no example recorded). A train row's hashes
are written after its features and before its ``finished`` mark, so every finished row says
which example it holds. A resume compares each batch with the finished rows it covers, a
checkpoint with the finished rows of one reference checkpoint (the lowest fully featurized
``model_id``, else the lowest with rows), and ``finalize`` every checkpoint with that
reference, which also catches jobs that ran at the same time; an experiment's targets are recorded by its first
``featurize_targets`` and compared by every later one. A mismatch raises
:class:`~trak_fast.fingerprint.ExampleMismatchError` (a reordered or different loader), never
silently pairs rows of different examples. A featurize that stops because the loader yielded
more or fewer than ``train_size`` examples clears the ``finished`` marks (and hashes) of the
rows it wrote, since which examples they hold is then unknown.

Versioning. ``metadata.json`` records ``STORE_FORMAT_VERSION``; a store written with another
version is refused with a clear error rather than misread.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

import numpy as np

from ..features.layout import layout_to_json
from . import distributed

if TYPE_CHECKING:
    from ..features.spec import FeatureSpec
    from ..features.tasks import Task
    from ..settings import FeatureSettings

#: Version of the layout above; bump it when the meaning of any file changes.
STORE_FORMAT_VERSION = 2    # 2: examples.npy (example fingerprints)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Temporary files written by _atomic_write_bytes / save_array_atomic / TRAK.score.
_TEMP = re.compile(r"^\..+\.tmp-(\d+)(\.npy)?$")

T = TypeVar("T")


class StoreMismatchError(ValueError):
    """Reopening a store with settings different from those it was created with."""


class StoreBusyError(RuntimeError):
    """Another process (or object) is featurizing the same checkpoint of this store right now."""


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before the rename (tagged with our pid)."""
    suffix = ".npy" if path.suffix == ".npy" else ""
    stem = path.stem if suffix else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name in the same directory, then rename."""
    tmp = temp_path(path)
    np.save(tmp, array)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_name(name: str, what: str = "experiment name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} must be a non-empty string of letters, digits, '_', '-' or '.', "
                         f"got {name!r}")
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Holds an exclusive ``flock`` on ``path`` (created if needed); yields False if
    ``blocking=False`` and someone else holds it. Each call opens its own file description,
    so two holders in one process exclude each other too (threads, or two Store objects)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            acquired = True
        except BlockingIOError:          # only raised with LOCK_NB: someone else holds it
            acquired = False
        if not acquired:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Store:
    """A store directory and its metadata (see the module docstring for the layout).

    ``settings`` are fixed when the store is created; opening an existing store with different
    settings raises :class:`StoreMismatchError` naming each difference. The caller validates
    ``settings`` before opening: whatever is passed here is written as the store's settings.
    """

    def __init__(self, path: Union[str, os.PathLike], settings: Dict[str, Any]):
        self.path = Path(path)
        self.metadata_path = self.path / "metadata.json"
        self.lock_path = self.path / ".lock"
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"save_dir {str(self.path)!r} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        # Under the lock, so two jobs creating the same store at once agree on its settings.
        with _flock(self.lock_path):
            if self.metadata_path.exists():
                self._check_settings(self._load()["settings"], settings)
            else:
                self._write({"format_version": STORE_FORMAT_VERSION, "settings": dict(settings),
                             "models": {}, "experiments": {}})
            self._remove_stale_temp_files()
        self.settings: Dict[str, Any] = self._load()["settings"]   # fixed for the store's life

    def _load(self) -> Dict[str, Any]:
        try:
            metadata = json.loads(self.metadata_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read store metadata {str(self.metadata_path)!r}: {exc}") from exc
        version = metadata.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise ValueError(
                f"the store at {str(self.path)!r} has format version {version!r}; this trak_fast "
                f"reads version {STORE_FORMAT_VERSION}. Use the trak_fast version that wrote it, "
                "or featurize again into a new directory.")
        return metadata

    def _write(self, metadata: Dict[str, Any]) -> None:
        _atomic_write_bytes(self.metadata_path,
                            json.dumps(metadata, indent=1, sort_keys=True).encode())

    def _check_settings(self, stored: Dict[str, Any], settings: Dict[str, Any]) -> None:
        differences = [f"{key}: store has {stored.get(key)!r}, got {value!r}"
                       for key, value in settings.items() if stored.get(key) != value]
        mine, theirs = settings.get("curvature", "kernel"), stored.get("curvature", "kernel")
        if "curvature" not in settings and mine != theirs:   # recorded only when not "kernel"
            differences.append(f"curvature: store has {theirs!r}, got {mine!r}")
        if differences:
            raise StoreMismatchError(
                f"the store at {str(self.path)!r} was created with different settings:\n  "
                + "\n  ".join(differences)
                + "\nOpen it with the same settings, or use a new save_dir.")

    def _remove_stale_temp_files(self) -> None:
        """Deletes ``.*.tmp-<pid>*`` files whose writer is dead (e.g. a killed ``score``).

        Files of live pids are left alone: they may be another job's write in progress.
        """
        folders = [self.path] + [p for p in self.path.iterdir()
                                 if p.is_dir() and p.name.startswith(("model_", "experiment_"))]
        for folder in folders:
            for item in folder.iterdir():
                match = _TEMP.match(item.name)
                if match and not _pid_alive(int(match.group(1))):
                    with contextlib.suppress(FileNotFoundError):
                        item.unlink()

    # ---- metadata: fresh reads, locked read-modify-write -----------------------------------

    @property
    def metadata(self) -> Dict[str, Any]:
        """The metadata as it is on disk now (a fresh copy; changing it changes nothing)."""
        return self._load()

    def update(self, change: Callable[[Dict[str, Any]], T]) -> T:
        """Applies ``change(metadata)`` to the current metadata, atomically; returns its result.

        Holds the store lock while re-reading ``metadata.json``, calling ``change`` (which
        mutates the dict in place and may raise to abort: nothing is then written) and writing
        the result, so concurrent updates from other processes are never lost.
        """
        with _flock(self.lock_path):
            metadata = self._load()
            result = change(metadata)
            self._write(metadata)
        return copy.deepcopy(result)

    @contextlib.contextmanager
    def model_lock(self, model_id: int) -> Iterator[None]:
        """Exclusive right to write checkpoint ``model_id``'s train arrays, or StoreBusyError."""
        path = self.path / f".lock-model_{model_id}"
        with _flock(path, blocking=False) as acquired:
            if not acquired:
                raise StoreBusyError(
                    f"model_id {model_id} of the store at {str(self.path)!r} is being featurized "
                    f"by another process or TRAK object right now ({str(path)!r} is locked); "
                    "featurize another model_id, or rerun this one when it is done (it resumes)")
            yield

    # ---- per-model train arrays -------------------------------------------------------------

    @property
    def train_columns(self) -> int:
        """Columns of ``features.npy``: ``k``, or ``(1 + C) k`` (``[G | S_1 .. S_C]``, ``C`` the
        task's ``fisher_chunks``) for the Fisher."""
        k = self.settings["num_features"]
        if self.settings.get("curvature", "kernel") != "fisher":
            return k
        return (1 + self.settings.get("fisher_chunks", 1)) * k

    def model_entry(self, model_id: int) -> Optional[Dict[str, Any]]:
        return self.metadata["models"].get(str(model_id))

    def model_dir(self, model_id: int) -> Path:
        return self.path / f"model_{model_id}"

    def open_train_arrays(self, model_id: int, feature_dtype: str
                          ) -> Tuple[np.memmap, np.memmap, np.memmap, np.memmap]:
        """``(features [n, k], out_to_loss [n], finished [n], examples [n, 2])`` memmaps,
        created if needed (``finished.npy`` last)."""
        n, k = self.settings["train_size"], self.train_columns
        folder = self.model_dir(model_id)
        folder.mkdir(exist_ok=True)
        paths = [folder / "features.npy", folder / "out_to_loss.npy", folder / "examples.npy",
                 folder / "finished.npy"]
        specs = [(feature_dtype, (n, k)), ("float32", (n,)), ("uint64", (n, 2)), ("uint8", (n,))]
        mode = "r+" if paths[-1].exists() else "w+"
        arrays = []
        for path, (dtype, shape) in zip(paths, specs):
            if mode == "w+":
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                array.flush()
            else:
                array = np.lib.format.open_memmap(path, mode="r+")
                if array.shape != shape or array.dtype != np.dtype(dtype):
                    raise ValueError(f"{str(path)!r} holds {array.dtype} {array.shape}, expected "
                                     f"{np.dtype(dtype)} {shape}; the store is damaged")
            arrays.append(array)
        return arrays[0], arrays[1], arrays[3], arrays[2]

    def read_train_examples(self, model_id: int) -> Optional[np.ndarray]:
        """Checkpoint ``model_id``'s example hashes ``[n, 2]``, 0 where a row is not finished
        (``None`` if it has no train arrays yet). A copy: safe while its job keeps writing."""
        folder = self.model_dir(model_id)
        try:
            finished = np.load(folder / "finished.npy", mmap_mode="r")
            examples = np.array(np.load(folder / "examples.npy", mmap_mode="r"))
        except FileNotFoundError:
            return None
        examples[np.asarray(finished) == 0] = 0
        return examples

    def read_train_arrays(self, model_id: int) -> Tuple[np.memmap, np.memmap]:
        folder = self.model_dir(model_id)
        return (np.load(folder / "features.npy", mmap_mode="r"),
                np.load(folder / "out_to_loss.npy", mmap_mode="r"))

    # ---- experiments ------------------------------------------------------------------------

    def experiment_dir(self, name: str) -> Path:
        return self.path / f"experiment_{check_name(name)}"

    def targets_path(self, name: str, model_id: int) -> Path:
        return self.experiment_dir(name) / f"targets_{model_id}.npy"

    def target_examples_path(self, name: str) -> Path:
        return self.experiment_dir(name) / "examples.npy"

    def scores_path(self, name: str) -> Path:
        return self.experiment_dir(name) / "scores.npy"

    # ---- finalized kernels ------------------------------------------------------------------

    def save_kernels(self, model_id: int, key: str, kernels: Any) -> None:
        """Writes ``[(block, Kernel)]`` under ``key`` (``"<kernel>/<weights>"``) as
        ``model_<id>/kernel_<kernel>_<weights>_<i>.npy`` and records them (one update)."""
        folder, value = self.model_dir(model_id), []
        for i, (block, kernel) in enumerate(kernels):
            name = f"kernel_{key.replace('/', '_')}_{i}.npy"
            save_array_atomic(folder / name, kernel.matrix.cpu().numpy())
            value.append({"layer": block.layer, "start": block.start, "stop": block.stop,
                          "form": kernel.form, "file": name})

        def record(metadata: Dict[str, Any]) -> None:
            metadata["models"][str(model_id)].setdefault("kernels", {})[key] = value
        self.update(record)

    def stored_kernels(self, model_id: int, key: str) -> Optional[list]:
        """``[(entry, matrix loader)]`` saved under ``key``, or ``None`` if never finalized;
        ``entry`` has ``layer``, ``start``, ``stop``, ``form``."""
        entry = self.model_entry(model_id)
        stored = None if entry is None else (entry.get("kernels") or {}).get(key)
        if stored is None:
            return None
        folder = self.model_dir(model_id)
        return [(b, (lambda file=b["file"]: np.load(folder / file))) for b in stored]


def store_settings(features: FeatureSettings, spec: FeatureSpec, task: Task, train_size: int,
                   grad_wrt: Optional[List[str]], curvature: str = "kernel",
                   fisher_chunks: int = 1) -> Dict[str, Any]:
    """What a store records and checks on reopening (the keys of format version 2)."""
    settings = {
        "train_size": train_size, "proj_dim": spec.proj_dim, "kind": features.kind,
        "seed": features.seed, "grad_wrt": grad_wrt, "feature_dtype": features.feature_dtype,
        "task": task.name, "num_grad_params": spec.num_grad_params,
        "num_features": spec.num_features, "projection": features.projection,
        "factored_dims": None if spec.factored_dims is None else list(spec.factored_dims),
        "layout": layout_to_json(spec.layout),
    }
    if features.kind == "sparse":  # recorded only for sparse, so dense stores keep their settings
        settings["nnz"] = features.nnz
    if curvature != "kernel":      # likewise: [G | S_1 .. S_C] train rows (see TRAK's curvature)
        settings["curvature"] = curvature
        settings["fisher_chunks"] = fisher_chunks
    return settings


def open_store(save_dir: Union[str, os.PathLike], settings: Dict[str, Any]) -> "Store":
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
