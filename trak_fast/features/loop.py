"""The featurize loop: every batch of a loader checked once, then featurized.

:func:`batches` is the one loop over a loader that every caller uses (:func:`featurize`, the
store's resumable :meth:`trak_fast.TRAK.featurize` and the distributed path): it checks each
batch's structure and per-example shapes once and yields it with its position, so the caller
only decides what to do with it (compute it, skip it as already written, leave it to another
rank).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Mapping, NamedTuple, Optional, \
    Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..settings import FeatureSettings, feature_settings
from .featurizer import Featurizer
from .layout import FeatureBlock
from .model import Batch, Device, compute_device
from .tasks import Task, get_task


class Features:
    """One checkpoint's train features: ``phi [n, k]``, out-to-loss weights ``out_to_loss [n]``
    (``None`` when not requested), ``layout``, the :class:`~trak_fast.features.layout.FeatureBlock`
    of each group of columns, and ``paths``: which parameters took the hook path, which vmap,
    and which were left out (``projection="factored"``). Unpacks as ``phi, out_to_loss = features``."""

    __slots__ = ("phi", "out_to_loss", "layout", "paths")

    def __init__(self, phi: torch.Tensor, out_to_loss: Optional[torch.Tensor],
                 layout: Sequence[FeatureBlock] = (), paths: Optional[dict] = None):
        self.phi, self.out_to_loss, self.layout = phi, out_to_loss, list(layout)
        self.paths = paths

    def __iter__(self):
        return iter((self.phi, self.out_to_loss))

    def __repr__(self) -> str:
        return (f"Features(phi={tuple(self.phi.shape)}, out_to_loss="
                f"{None if self.out_to_loss is None else tuple(self.out_to_loss.shape)}, "
                f"{len(self.layout)} blocks)")


class LoaderBatch(NamedTuple):
    """A checked batch: its index in the loader, a name for messages, its first row, size."""

    index: int
    where: str
    first_row: int
    size: int
    batch: Batch


def batches(loader: Iterable[Batch], what: str, task: Task, *, progress: bool = False,
            desc: Optional[str] = None) -> Iterator[LoaderBatch]:
    """Each batch of ``loader`` with its position, after the task's structure check and the
    per-example shape check (see :func:`check_same_shapes`); an empty batch raises."""
    try:
        iterator = iter(loader)
    except TypeError as exc:
        raise TypeError(f"{what} must be an iterable of batches, got {type(loader).__name__}") from exc
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    shapes, row = None, 0
    for index, batch in enumerate(tqdm(iterator, desc=desc or what, unit="batch", total=total,
                                       disable=not progress, leave=False)):
        where = f"{what} batch {index}"
        size = task.check_batch(batch, where)
        if task.fixed_shapes:
            shapes = check_same_shapes(batch, shapes, where)
        if size == 0:
            raise ValueError(f"{where} is empty (batch size 0)")
        yield LoaderBatch(index, where, row, size, batch)
        row += size


def no_batches(what: str) -> ValueError:
    return ValueError(f"{what} yielded no batches: expected an iterable of batches "
                      "(a list or a DataLoader that can be iterated again for every checkpoint)")


def featurize(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
              loader: Iterable[Batch], *, task: Union[str, Task] = "classification",
              settings: Optional[FeatureSettings] = None, model_id: int = 0,
              device: Optional[Device] = None, progress: bool = False, out_to_loss: bool = True,
              what: str = "train", before_batch: Optional[Callable[[str, int, Batch], None]] = None,
              optimizer_state: Any = None, **options: Any) -> Features:
    """Features of every example in ``loader`` under one checkpoint, in memory.

    Returns ``Features(phi [n, k], out_to_loss [n])`` on the CPU: ``phi`` float32 (float64 for
    a float64 model), ``phi[i] = P_m^T grad f(z_i)`` with ``P_m`` scaled by ``1/sqrt(k)`` so
    that ``E ||phi_i||^2 = ||grad f(z_i)||^2``; raw gradients when ``proj_dim=None``.
    ``out_to_loss`` is ``None`` when not requested. A gradient dot product baseline is
    ``featurize(...).phi @ target_features(...).T``. ``settings`` / keyword ``options``
    (``proj_dim=``, ``projection=``, ...) and ``optimizer_state`` (the checkpoint's Adam state:
    gradients divided by its ``sqrt(v_hat) + eps``) as in :class:`~trak_fast.Featurizer`.

    ``before_batch(where, first_row, batch)``, if given, is called before each batch is
    featurized (e.g. a :class:`trak_fast.pipeline.fingerprint.Ledger` that raises on a
    reordered loader).
    """
    settings = feature_settings(options, settings, where="featurize()", task=get_task(task))
    if isinstance(model, torch.nn.Module):
        device = compute_device(model, device)
    featurizer = Featurizer(model, checkpoint, task=task, settings=settings, model_id=model_id,
                            device=device, optimizer_state=optimizer_state)
    return featurize_with(featurizer, loader, what=what, out_to_loss=out_to_loss,
                          before_batch=before_batch, progress=progress)


def featurize_with(featurizer: Featurizer, loader: Iterable[Batch], *, what: str = "train",
                   out_to_loss: bool = True, progress: bool = False,
                   before_batch: Optional[Callable[[str, int, Batch], None]] = None) -> Features:
    """:func:`featurize` with a :class:`~trak_fast.Featurizer` already made."""
    phis: List[torch.Tensor] = []
    qs: List[torch.Tensor] = []
    for item in batches(loader, what, featurizer.task, progress=progress):
        if before_batch is not None:
            before_batch(item.where, item.first_row, item.batch)
        phi, q = featurizer.compute(item.batch, item.size, where=item.where, out_to_loss=out_to_loss)
        phis.append(phi.cpu())
        if q is not None:
            qs.append(q.cpu())
    if not phis:
        raise no_batches(what)
    return Features(torch.cat(phis), torch.cat(qs) if out_to_loss else None, featurizer.layout,
                    featurizer.gradient_paths)


def target_features(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
                    loader: Iterable[Batch], **kwargs: Any) -> torch.Tensor:
    """``phi [n_targets, k]`` for target examples (same arguments as :func:`featurize`)."""
    kwargs.setdefault("what", "targets")
    return featurize(model, checkpoint, loader, out_to_loss=False, **kwargs).phi


def check_same_shapes(batch: Batch, previous: Optional[List[Tuple[int, ...]]], where: str
                      ) -> List[Tuple[int, ...]]:
    """Per-example shapes (all but the batch dimension) must agree from batch to batch.

    Catches a loader whose examples change shape (e.g. a wrong transform) before the model
    fails on it with an unrelated message. Tasks with variable-length inputs (padded text)
    set ``Task.fixed_shapes = False`` to skip the check, and dict batches (Hugging Face's
    ``{input_ids, attention_mask, ...}``, padded per batch) are exempt.
    """
    if isinstance(batch, Mapping):
        return previous
    shapes = [tuple(t.shape[1:]) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if previous is not None and shapes != previous:
        raise ValueError(f"{where}: per-example shapes {shapes} differ from those of the first "
                         f"batch {previous}; every batch of a loader must hold examples of one shape")
    return shapes
