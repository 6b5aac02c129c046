"""The on-disk store: ``.npy`` memmaps plus one JSON metadata file written atomically.

Layout of a store directory::

    metadata.json                       settings, per-model and per-experiment state
    model_<id>/features.npy             [n, k] float32 or float16   (phi_m, row i = train example i)
    model_<id>/out_to_loss.npy          [n] float32                 (Q_m)
    model_<id>/finished.npy             [n] uint8                   (1 = row i is written)
    model_<id>/kernel.npy               [k, k] or [n, n] float64    (finalized kernel)
    experiment_<name>/targets_<id>.npy  [t, k] float32              (target features, model id)
    experiment_<name>/scores.npy        [n, t] float32              (the ensemble's scores)

Crash safety. ``metadata.json`` is replaced atomically (written to a temporary file, flushed,
renamed), so it is always either the old or the new version. Train rows are written batch by
batch: features and Q first, then (after a flush) the batch's rows in ``finished.npy``, so a
row marked finished is always complete. ``finished.npy`` is created last, after the arrays
it describes; a model directory without it is recreated from scratch. Whole arrays (kernels,
target features, scores) are written to a temporary name and renamed.

Versioning. ``metadata.json`` records ``STORE_FORMAT_VERSION``; a store written with another
version is refused with a clear error rather than misread.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

#: Version of the layout above; bump it when the meaning of any file changes.
STORE_FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class StoreMismatchError(ValueError):
    """Reopening a store with settings different from those it was created with."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name in the same directory, then rename."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_name(name: str, what: str = "experiment name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} must be a non-empty string of letters, digits, '_', '-' or '.', "
                         f"got {name!r}")
    return name


class Store:
    """A store directory and its metadata (see the module docstring for the layout).

    ``settings`` are fixed when the store is created; opening an existing store with different
    settings raises :class:`StoreMismatchError` naming each difference.
    """

    def __init__(self, path: Union[str, os.PathLike], settings: Dict[str, Any]):
        self.path = Path(path)
        self.metadata_path = self.path / "metadata.json"
        if self.metadata_path.exists():
            self.metadata = self._load()
            self._check_settings(settings)
        else:
            if self.path.exists() and not self.path.is_dir():
                raise ValueError(f"save_dir {str(self.path)!r} exists and is not a directory")
            self.path.mkdir(parents=True, exist_ok=True)
            self.metadata = {"format_version": STORE_FORMAT_VERSION, "settings": dict(settings),
                             "models": {}, "experiments": {}}
            self.save_metadata()
        self.settings = self.metadata["settings"]

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

    def _check_settings(self, settings: Dict[str, Any]) -> None:
        stored = self.metadata["settings"]
        differences = [f"{key}: store has {stored.get(key)!r}, got {value!r}"
                       for key, value in settings.items() if stored.get(key) != value]
        if differences:
            raise StoreMismatchError(
                f"the store at {str(self.path)!r} was created with different settings:\n  "
                + "\n  ".join(differences)
                + "\nOpen it with the same settings, or use a new save_dir.")

    def save_metadata(self) -> None:
        _atomic_write_bytes(self.metadata_path,
                            json.dumps(self.metadata, indent=1, sort_keys=True).encode())

    # ---- per-model train arrays -------------------------------------------------------------

    def model_entry(self, model_id: int) -> Optional[Dict[str, Any]]:
        return self.metadata["models"].get(str(model_id))

    def model_dir(self, model_id: int) -> Path:
        return self.path / f"model_{model_id}"

    def open_train_arrays(self, model_id: int, feature_dtype: str
                          ) -> Tuple[np.memmap, np.memmap, np.memmap]:
        """``(features [n, k], out_to_loss [n], finished [n])`` memmaps, created if needed."""
        n, k = self.settings["train_size"], self.settings["num_features"]
        folder = self.model_dir(model_id)
        folder.mkdir(exist_ok=True)
        paths = [folder / "features.npy", folder / "out_to_loss.npy", folder / "finished.npy"]
        specs = [(feature_dtype, (n, k)), ("float32", (n,)), ("uint8", (n,))]
        mode = "r+" if paths[2].exists() else "w+"
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
        return arrays[0], arrays[1], arrays[2]

    def read_train_arrays(self, model_id: int) -> Tuple[np.memmap, np.memmap]:
        folder = self.model_dir(model_id)
        return (np.load(folder / "features.npy", mmap_mode="r"),
                np.load(folder / "out_to_loss.npy", mmap_mode="r"))

    # ---- experiments ------------------------------------------------------------------------

    def experiment_dir(self, name: str) -> Path:
        return self.path / f"experiment_{check_name(name)}"
