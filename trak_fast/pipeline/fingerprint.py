"""Example fingerprints: catching a loader that yields other examples, or the same in another order.

TRAK's row ``i`` is "train example ``i``" in every checkpoint's features, in a resumed run and
in the target features of an experiment. A loader that shuffles, or a resume with another
loader, silently pairs rows of different examples and gives noise for scores. So each pass
records a fingerprint of every example it featurized, and a later pass (a resume, another
checkpoint, another checkpoint's targets) compares its examples with those of the same rows.

What is hashed, per example (row ``b`` of a batch), for every tensor of the batch pytree in
pytree order:

- the structure: the pytree layout, and each tensor's dtype and per-example shape (all but the
  batch dimension). This alone forms the *structure hash*, so an error can say "the shapes or
  dtypes changed" rather than "the values changed";
- the bytes of the example's elements: all of them when the example has at most
  ``FULL_ELEMENTS`` elements in that tensor (labels, token ids, small images), otherwise
  ``SAMPLED_ELEMENTS`` elements at fixed, evenly spread positions (first and last included).

Why it is cheap: at most ``B x FULL_ELEMENTS`` elements per tensor are read (a gather of a few
columns for large inputs; the same positions in every batch), copied to the CPU and fed to
``blake2b``, which hashes ~0.5-1 GB/s on one core. Featurizing the same batch differentiates
and projects ``p`` parameters per example, so the fingerprint is noise next to it. The values
are hashed bitwise, so a loader with random augmentation is reported too (TRAK needs
deterministic examples). A sampled tensor that changes only away from the sampled positions
is not detected; labels and the sampled positions catch the mistakes this is for (a
shuffled, shifted or different data set).

Batching may change between passes (hashes are per example), with one exception: inputs
padded per batch (tasks with ``fixed_shapes = False``) carry their padding into the example's
shape and bytes, so such loaders must keep their batching too.

Each example gets two 64-bit hashes ``[structure, content]`` (never 0: 0 means "no example
recorded for this row"), stored as uint64 ``[n, 2]`` arrays.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.utils import _pytree as pytree

#: Examples with at most this many elements in a tensor are hashed whole.
FULL_ELEMENTS = 4096
#: Elements hashed per example of a larger tensor, at fixed evenly spaced positions.
SAMPLED_ELEMENTS = 64

SHUFFLE_HINT = ("TRAK needs the same examples in the same order on every pass: a DataLoader "
                "with shuffle=False (no random sampler) and deterministic transforms")


class ExampleMismatchError(ValueError):
    """A loader yielded other examples (or the same in another order) than an earlier pass."""


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") | 1


def _rows(tensor: torch.Tensor, batch_size: int) -> np.ndarray:
    """``[B, bytes]`` uint8: each example's hashed elements (all, or the fixed sample)."""
    flat = tensor.detach().reshape(batch_size, -1)
    width = flat.shape[1]
    if width > FULL_ELEMENTS:
        positions = torch.linspace(0, width - 1, SAMPLED_ELEMENTS, device=flat.device).round().long()
        flat = flat[:, positions]
    flat = flat.cpu().contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().reshape(batch_size, -1)


def signature(batch: Any) -> str:
    """The batch's structure as text: its pytree with each tensor as ``dtype[example shape]``."""
    def describe(leaf: Any) -> str:
        if isinstance(leaf, torch.Tensor):
            return f"{str(leaf.dtype).replace('torch.', '')}{list(leaf.shape[1:])}"
        return type(leaf).__name__
    return repr(pytree.tree_map(describe, batch)).replace("'", "")


def example_hashes(batch: Any, where: str = "batch") -> np.ndarray:
    """``[B, 2]`` uint64: ``(structure hash, content hash)`` of each example of ``batch``."""
    tensors = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError(f"{where} must hold tensors with a batch dimension")
    for t in tensors:
        if t.is_meta:
            raise ValueError(f"{where} holds a tensor on the meta device (shape {tuple(t.shape)}), "
                             "which has no values; load the data onto the CPU or a GPU")
    size = tensors[0].shape[0]
    structure = signature(batch).encode()
    rows = np.concatenate([_rows(t, size) for t in tensors], axis=1)
    out = np.empty((size, 2), dtype=np.uint64)
    out[:, 0] = _digest(structure)
    for b in range(size):
        out[b, 1] = _digest(structure + b"|" + rows[b].tobytes())
    return out


def check_rows(hashes: np.ndarray, expected: np.ndarray, *, where: str, first_row: int,
               against: str, reference: Optional[np.ndarray] = None,
               start_over: str = "", now: str = "") -> None:
    """Raises :class:`ExampleMismatchError` unless ``hashes`` equal ``expected`` on recorded rows.

    ``expected [B, 2]`` holds the earlier pass's hashes of the same rows (rows where either
    side is 0, not recorded, are not compared); ``reference`` (all of the earlier pass's rows) lets the message tell a
    reordering from different data. ``against`` names the earlier pass ("the interrupted
    run", "checkpoint 0"); ``start_over`` says how to discard it; ``now`` is the batch's
    :func:`signature`, quoted when the structure changed.
    """
    recorded = (expected[:, 1] != 0) & (hashes[:, 1] != 0)
    differ = recorded & (hashes[:, 1] != expected[:, 1])
    if not differ.any():
        return
    bad = np.flatnonzero(differ)
    rows = f"rows {first_row + bad[0]}" + (f"-{first_row + bad[-1]}" if len(bad) > 1 else "")
    if (hashes[bad, 0] != expected[bad, 0]).any():
        what = (f"the shapes or dtypes of its tensors differ (now {now or 'unknown'}); "
                "the loader's transform or collate changed")
    else:
        pool = expected if reference is None else reference
        known = np.isin(hashes[bad, 1], pool[:, 1][pool[:, 1] != 0])
        if known.all():
            what = ("it holds the same examples in another order: the loader shuffles or "
                    "reorders (pass shuffle=False to the DataLoader)")
        elif known.any():
            what = ("some of its examples were recorded at other rows, the others not at all: "
                    "a shuffled or shifted loader, or another data set (pass shuffle=False to "
                    "the DataLoader)")
        else:
            what = ("its examples are different ones: another data set, split, transform or "
                    "random augmentation (or a shuffling loader: pass shuffle=False)")
    raise ExampleMismatchError(
        f"{where} ({len(bad)} of {len(hashes)} examples, {rows}) does not match {against}: "
        f"{what}. {SHUFFLE_HINT}." + (f" {start_over}" if start_over else ""))


class Ledger:
    """The hashes of one pass over a loader, checked row by row against an earlier pass.

    Call it with ``(where, first_row, batch)`` before featurizing each batch; it raises
    before any work on a batch that differs from ``reference`` (``None``: the first pass,
    nothing to compare). :attr:`hashes` is what this pass saw, ``[rows so far, 2]``.
    """

    def __init__(self, what: str, reference: Optional[np.ndarray] = None, against: str = ""):
        self.what = what
        self.reference = reference
        self.against = against
        self._parts = []
        self.rows = 0

    def __call__(self, where: str, first_row: int, batch: Any) -> None:
        hashes = example_hashes(batch, where)
        stop = first_row + len(hashes)
        if self.reference is not None:
            if stop > len(self.reference):
                raise ExampleMismatchError(
                    f"{where}: {self.what} yielded more than the {len(self.reference)} examples "
                    f"{self.against} saw ({stop} by this batch). {SHUFFLE_HINT}.")
            check_rows(hashes, self.reference[first_row:stop], where=where, first_row=first_row,
                       against=self.against, reference=self.reference, now=signature(batch))
        self._parts.append(hashes)
        self.rows = stop

    @property
    def hashes(self) -> np.ndarray:
        if not self._parts:
            return np.zeros((0, 2), dtype=np.uint64)
        return np.concatenate(self._parts)


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


def moments_fingerprint(moments) -> Optional[str]:
    """A hash of the second moments a featurizer divides by (``optimizer_state=``; ``None``:
    none), recorded with a store's train rows so that its targets use the same."""
    return None if moments is None else checkpoint_fingerprint(moments.inverse)
