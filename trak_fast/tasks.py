"""Tasks: what TRAK differentiates (the model output f) and how it weights train rows (Q).

For a training example ``z`` and parameters ``theta`` a task defines

- the model output ``f(z; theta)``, a scalar whose per-example gradient is the TRAK feature
  before projection: ``phi(z) = P^T grad_theta f(z; theta)``;
- the out-to-loss weight ``Q(z) = -d loss / d f`` at ``z``, which weights train rows in the
  final scores ``tau = mean_m(S_m) * mean_m(Q_m)``.

The built-in :class:`ClassificationTask` uses the margin ``f = logit_y - logsumexp(other
logits)``; for cross-entropy the loss is ``log(1 + exp(-f))``, so ``Q = 1 - p_y``.

Writing your own task means subclassing :class:`Task`. ``output`` sees **one** example (the
batch dimension removed, as ``torch.func.vmap`` hands it over) and a ``model`` callable that
runs the checkpoint on a **batch**; ``out_to_loss`` sees a whole batch. Batches can be any
pytree of tensors (tuples, dicts), e.g. a text model's ``{"input_ids": ..., "labels": ...}``::

    class NextTokenMargin(Task):
        def output(self, model, example):
            logits = model(input_ids=example["input_ids"][None])[0, -1]   # [vocab]
            return margin(logits, example["labels"])                       # 0-d
        def out_to_loss(self, model, batch):
            logits = model(input_ids=batch["input_ids"])[:, -1]
            return 1 - logits.softmax(-1).gather(1, batch["labels"][:, None])[:, 0]
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Union

import torch
from torch.utils import _pytree as pytree

ModelFn = Callable[..., torch.Tensor]


def batch_size_of(batch: Any, where: str) -> int:
    """The shared leading dimension of every tensor in ``batch``; raises if they disagree."""
    leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError(f"{where} must contain tensors, got {type(batch).__name__} without any")
    sizes = [t.shape[0] if t.dim() > 0 else None for t in leaves]
    if sizes[0] is None or any(s != sizes[0] for s in sizes):
        shapes = [tuple(t.shape) for t in leaves]
        raise ValueError(
            f"{where}: every tensor must have the same batch size in dimension 0, got shapes {shapes}"
        )
    return int(sizes[0])


class Task(abc.ABC):
    """A model-output function ``f(z; theta)`` and its out-to-loss weight ``Q``.

    Subclasses implement :meth:`output` and :meth:`out_to_loss`; they may extend
    :meth:`check_batch` to validate batches with a clear message before any work is done.
    """

    #: Recorded in stores, so that reopening one with a different task fails loudly.
    name: str = "custom"
    #: Whether every batch of a loader holds examples of one shape (checked batch to batch).
    #: Set False for variable-length inputs such as dynamically padded text.
    fixed_shapes: bool = True

    @abc.abstractmethod
    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        """``f(z; theta)`` for one example, a 0-d tensor.

        ``example`` is one element of a batch (the batch dimension removed); ``model(*args,
        **kwargs)`` runs the checkpoint on a batch, so add a batch dimension of 1 yourself.
        Called under ``torch.func.vmap`` and ``grad``: no Python branching on tensor values.
        """

    @abc.abstractmethod
    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """``Q_i = -d loss / d f`` at each example of the batch, shape ``[B]`` (no gradient)."""

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """``[f(z_1), ..., f(z_B)]`` for a whole batch in one forward pass, shape ``[B]``.

        Optional. The hook-based gradient path (``gradients="hooks"``) differentiates
        ``sum_b f(z_b)`` in one ordinary batched backward pass, so it needs this batched
        form; example ``b``'s output must depend on example ``b`` only. A task that does not
        define it keeps the ``torch.func.vmap`` path of :meth:`output`.
        """
        raise NotImplementedError(f"task {self.name!r} defines no batched outputs()")

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any
                                ) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(f [B], Q [B])``; built-in tasks share one forward pass between the two.

        ``f`` keeps its graph (it is differentiated); ``Q`` is detached.
        """
        f = self.outputs(model, batch)
        with torch.no_grad():
            q = self.out_to_loss(model, batch)
        return f, q

    @property
    def has_batched_outputs(self) -> bool:
        """Whether :meth:`outputs` is this task's own (the hook path needs it).

        A subclass that overrides :meth:`output` but inherits ``outputs`` from its parent
        (say, a custom task derived from :class:`ClassificationTask`) would differentiate the
        parent's function on the hook path; such a task keeps the vmap path.
        """
        cls = type(self)
        return _definer(cls, "outputs") is not Task and \
            issubclass(_definer(cls, "outputs"), _definer(cls, "output"))

    def batched_outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        """:meth:`outputs_and_out_to_loss` when it is as recent as ``outputs`` and
        ``out_to_loss`` in the class hierarchy, else the two called separately."""
        cls = type(self)
        shared = _definer(cls, "outputs_and_out_to_loss")
        if issubclass(shared, _definer(cls, "outputs")) and \
                issubclass(shared, _definer(cls, "out_to_loss")):
            return self.outputs_and_out_to_loss(model, batch)
        return Task.outputs_and_out_to_loss(self, model, batch)

    def check_batch(self, batch: Any, where: str) -> int:
        """Validates one batch and returns its size. ``where`` names it in error messages."""
        return batch_size_of(batch, where)


def _definer(cls: type, attribute: str) -> type:
    """The class in ``cls``'s MRO that defines ``attribute``."""
    return next(k for k in cls.__mro__ if attribute in vars(k))


def _margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``logits[label] - logsumexp(logits[other classes])`` for one example's ``[C]`` logits."""
    is_label = torch.arange(logits.shape[-1], device=logits.device) == label
    correct = (logits * is_label).sum()
    others = logits.masked_fill(is_label, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def _batched_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`_margin` of every row of ``logits [B, C]``: ``[B]``."""
    is_label = torch.arange(logits.shape[-1], device=logits.device)[None, :] == labels[:, None]
    correct = (logits * is_label).sum(-1)
    others = logits.masked_fill(is_label, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


class ClassificationTask(Task):
    """Multiclass classification from ``(inputs, labels)`` batches and a model giving logits.

    ``f = logit_y - logsumexp_{c != y} logit_c`` (the margin) and ``Q = 1 - softmax(logits)_y``,
    MadryLab trak's ``image_classification`` task. ``inputs`` is a tensor ``[B, ...]``;
    ``labels`` int64 ``[B]`` in ``[0, C)`` where ``C`` is the number of logits.
    """

    name = "classification"

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        inputs, label = example
        logits = model(inputs.unsqueeze(0))[0]
        return _margin(logits, label)

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return self._q(self._logits(model, inputs, labels), labels)

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return _batched_margin(self._logits(model, inputs, labels), labels)

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        inputs, labels = batch
        logits = self._logits(model, inputs, labels)
        return _batched_margin(logits, labels), self._q(logits.detach(), labels)

    @staticmethod
    def _q(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1).gather(1, labels[:, None].long())[:, 0]
        return 1.0 - p

    @staticmethod
    def _logits(model: ModelFn, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"the classification task needs the model to return logits [B, C] = "
                f"[{labels.shape[0]}, C], got shape {tuple(logits.shape)}"
            )
        classes = logits.shape[1]
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"labels must lie in [0, {classes}) for a model with {classes} logits, "
                f"got labels in [{low}, {high}]"
            )
        return logits

    def check_batch(self, batch: Any, where: str) -> int:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"{where}: the classification task expects (inputs, labels) batches, "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, labels = batch
        if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(f"{where}: inputs and labels must be tensors, got "
                            f"{type(inputs).__name__} and {type(labels).__name__}")
        if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                     torch.int8, torch.uint8):
            raise ValueError(f"{where}: labels must be a 1-D integer tensor [B], got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        return batch_size_of(batch, where)


class RegressionTask(Task):
    """Scalar regression with squared loss, ``(inputs, targets)`` batches.

    ``f = model(x)`` (one output per example; shape ``[B]`` or ``[B, 1]``) and, for
    ``loss = (f - y)^2 / 2``, ``Q = -d loss / d f = y - f``: the residual weights each train row.
    Also the worked example of a custom task.
    """

    name = "regression"

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        inputs, _ = example
        return model(inputs.unsqueeze(0)).reshape(())

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.outputs_and_out_to_loss(model, batch)[1]

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        output = model(inputs)
        prediction = output.reshape(targets.shape[0], -1)
        if prediction.shape[1] != 1:
            raise ValueError(f"the regression task needs one output per example, got model "
                             f"output of shape {tuple(output.shape)}")
        return prediction[:, 0]

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        f = self.outputs(model, batch)
        targets = batch[1]
        return f, (targets.reshape(-1).to(f.dtype) - f.detach()).float()


_BUILT_IN: Dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
}


def get_task(task: Union[str, Task, None]) -> Task:
    """Returns ``task`` itself, or the built-in task of that name."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in _BUILT_IN:
        return _BUILT_IN[task]()
    raise ValueError(
        f"task must be a trak_fast.Task or one of {sorted(_BUILT_IN)}, got {task!r}"
    )

