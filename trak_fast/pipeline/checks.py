"""Checks run before any featurizing, so that a mistake costs milliseconds, not a run.

What is checked up front, and why it is cheap:

- the compute device: ``device="cuda"`` without a usable GPU, ``"meta"``, or a model whose
  parameters live on the meta device with ``device=None`` (no values to compute with);
- every checkpoint: keys and shapes against the model (on the meta device, so nothing is
  copied), no meta tensors, and finite values: parameters must be finite, buffers free of
  NaN (masks may hold ``-inf``). One read of each checkpoint, in chunks;
- each loader: a one-shot iterator (``iter(x) is x``: a generator) where it must be iterated
  once per checkpoint; a ``DataLoader`` with a random sampler (``shuffle=True``); the number of
  examples against ``train_size`` where it is known without loading data (a list of batches,
  or a ``DataLoader`` over a sized data set);
- the first batch against the task and the model: the task's structure check and one forward
  pass (no gradients) with the first checkpoint, of its first two examples when every tensor
  of the batch is per-example (else of all of it), which catches missing labels, wrong shapes
  and labels out of range there.

What cannot be seen without iterating the data is checked batch by batch, before each batch
is featurized: the structure and per-example shapes, the example fingerprints
(:mod:`trak_fast.fingerprint`) and the labels (in the same forward pass that computes Q). For
the classification task, labels of *every* batch are checked up front when the batches are
already in memory (a list or tuple of batches, or a ``DataLoader`` over a ``TensorDataset``):
that is a min/max over tensors that exist anyway. Other loaders would have to load every
batch, so a bad label in their last batch is found when that batch comes; in
:class:`~trak_fast.TRAK` the batches before it stay written and a rerun resumes after them.
"""
from __future__ import annotations

import collections.abc
import itertools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

from ..features.gradients.vmap import slice_batch
from ..features.model import Batch, checkpoint_tensors, eval_mode, to_device
from ..features.tasks import ClassificationTask, Task

_CHUNK = 1 << 24     # elements per finiteness check: bounds the temporary bool tensor


def check_checkpoint(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
                     where: str) -> None:
    """Keys, shapes, no meta tensors, finite parameters and NaN-free buffers."""
    checkpoint_tensors(model, checkpoint, torch.device("meta"), where=where)   # keys and shapes
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_meta:
            raise ValueError(f"{where}[{name!r}] is on the meta device (it holds no values); "
                             "load the real weights")
        if not (value.is_floating_point() or value.is_complex()):
            continue
        flat = value.detach().reshape(-1)
        bad = 0
        for chunk in flat.split(_CHUNK):
            bad += int((~torch.isfinite(chunk)).sum() if name in params else torch.isnan(chunk).sum())
        if bad:
            kind = "NaN or infinite" if name in params else "NaN"
            raise ValueError(f"{where}[{name!r}] holds {bad} {kind} values (of {flat.numel()}); "
                             "TRAK needs a checkpoint with finite weights (did training diverge?)")
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name not in persistent and buffer.is_meta:
            raise ValueError(f"the model's buffer {name!r} is not saved in checkpoints "
                             "(non-persistent) and is on the meta device; build the model on a "
                             "real device (e.g. model.to_empty(device='cpu')) before featurizing")


def _random_sampler(loader: torch.utils.data.DataLoader) -> Optional[str]:
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    for candidate in (sampler, loader.sampler):
        if candidate is None:
            continue
        name = type(candidate).__name__
        if isinstance(candidate, (torch.utils.data.RandomSampler,
                                  torch.utils.data.SubsetRandomSampler,
                                  torch.utils.data.WeightedRandomSampler)) \
                or getattr(candidate, "shuffle", False) is True:
            return name
    return None


def _known_examples(loader: Any, task: Task, what: str) -> Optional[Tuple[int, str]]:
    """``(number of examples, how it was found)`` if knowable without loading data."""
    if isinstance(loader, (list, tuple)):
        sizes = [task.check_batch(batch, f"{what} batch {i}") for i, batch in enumerate(loader)]
        return sum(sizes), f"{len(loader)} batches"
    if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
        try:
            examples = len(loader.sampler)
        except TypeError:
            return None
        if loader.drop_last:
            examples = examples // loader.batch_size * loader.batch_size
        return examples, f"a DataLoader over {examples} examples"
    return None


def check_loader(loader: Iterable[Batch], what: str, task: Task, *, passes: int,
                 expected: Optional[int] = None) -> None:
    """One-shot iterators iterated more than once, shuffling DataLoaders, a known length."""
    if not isinstance(loader, collections.abc.Iterable):
        raise TypeError(f"{what} must be an iterable of batches, got {type(loader).__name__}")
    if passes > 1 and isinstance(loader, collections.abc.Iterator):
        raise TypeError(f"{what} is a one-shot iterator ({type(loader).__name__}: iter({what}) is "
                        f"{what}), used up after one pass, but it is iterated once per checkpoint "
                        f"({passes} checkpoints); pass a list of batches or a DataLoader")
    if isinstance(loader, torch.utils.data.DataLoader):
        sampler = _random_sampler(loader)
        if sampler is not None:
            raise ValueError(f"{what} is a DataLoader with a random sampler ({sampler}, e.g. "
                             "shuffle=True): TRAK needs the same examples in the same order on "
                             "every pass; pass shuffle=False")
    known = _known_examples(loader, task, what)
    if expected is not None and known is not None and known[0] != expected:
        raise ValueError(f"{what} holds {known[0]} examples ({known[1]}), but train_size = "
                         f"{expected}; pass the data set the store was created for")


def peek(loader: Iterable[Batch], what: str) -> Tuple[Batch, Iterable[Batch]]:
    """``(first batch, loader to iterate)``; a one-shot iterator is given its batch back."""
    if isinstance(loader, collections.abc.Iterator):
        try:
            first = next(loader)
        except StopIteration:
            first = None
        loader = loader if first is None else itertools.chain([first], loader)
    elif isinstance(loader, collections.abc.Sequence):
        first = loader[0] if len(loader) else None
    else:
        first = next(iter(loader), None)
    if first is None:
        raise ValueError(f"{what} yielded no batches: expected an iterable of batches "
                         "(a list or a DataLoader that can be iterated again for every checkpoint)")
    return first, loader


def check_first_batch(model: torch.nn.Module, run: Callable[..., Any], task: Task,
                      batch: Batch, what: str, device: torch.device) -> Optional[int]:
    """The task's checks and one forward pass of ``run`` (see :func:`model_fn`); returns the
    number of classes for the classification task (else ``None``)."""
    where = f"{what} batch 0"
    size = task.check_batch(batch, where)
    if size == 0:
        raise ValueError(f"{where} is empty (batch size 0)")
    for t in pytree.tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise ValueError(f"{where} holds a tensor on the meta device (shape {tuple(t.shape)}), "
                             "which has no values; load the data onto the CPU or a GPU")
    # The forward pass on the first two examples only, when every tensor of the batch is
    # per-example (dimension 0 of size B): the same checks at a fraction of the cost.
    leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if size > 2 and leaves and all(t.dim() >= 1 and t.shape[0] == size for t in leaves):
        batch, size = slice_batch(batch, 0, 2), 2
    batch = to_device(batch, device)
    classes = None
    with eval_mode(model), torch.no_grad():
        try:
            q = task.out_to_loss(run, batch)
            if isinstance(task, ClassificationTask):
                classes = int(task.logits(run, batch).shape[-1])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except RuntimeError as exc:
            shapes = [tuple(t.shape) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
            raise RuntimeError(f"{where}: the model or task failed on this batch "
                               f"(shapes {shapes}): {exc}") from exc
    if q.numel() != size:
        raise ValueError(f"{where}: task.out_to_loss must return shape [{size}], got {tuple(q.shape)}")
    return classes


def check_all_labels(loader: Iterable[Batch], classes: int, what: str) -> None:
    """Labels in ``[0, classes)`` for every batch already in memory (see the module docstring)."""
    if isinstance(loader, (list, tuple)):
        labeled = [(f"{what} batch {i}", batch["labels"] if isinstance(batch, Mapping) else batch[1])
                   for i, batch in enumerate(loader)]
    elif isinstance(loader, torch.utils.data.DataLoader) and \
            isinstance(loader.dataset, torch.utils.data.TensorDataset) and \
            len(loader.dataset.tensors) == 2:
        labeled = [(f"{what} (its TensorDataset)", loader.dataset.tensors[1])]
    else:
        return
    for where, labels in labeled:
        if labels.numel() == 0 or labels.is_meta:
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{where}: labels must lie in [0, {classes}) for a model with "
                             f"{classes} logits, got labels in [{low}, {high}]")


def prepare_loader(loader: Iterable[Batch], what: str, *, model: torch.nn.Module,
                   run: Callable[..., Any], task: Task, device: torch.device,
                   passes: int, expected: Optional[int] = None) -> Iterable[Batch]:
    """All up-front checks of one loader; returns the loader to iterate (see :func:`peek`).
    ``run`` is the model with the first checkpoint (:func:`model_fn`)."""
    check_loader(loader, what, task, passes=passes, expected=expected)
    first, loader = peek(loader, what)
    classes = check_first_batch(model, run, task, first, what, device)
    if classes is not None:
        check_all_labels(loader, classes, what)
    return loader


def check_checkpoints(model: torch.nn.Module, checkpoints: Sequence[Mapping[str, torch.Tensor]]) -> None:
    for model_id, checkpoint in enumerate(checkpoints):
        check_checkpoint(model, checkpoint, f"checkpoint {model_id}")
