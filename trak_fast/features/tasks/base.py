"""Tasks: what TRAK differentiates (the model output f) and how it weights train rows (Q).

For a training example ``z`` and parameters ``theta`` a task defines

- the model output ``f(z; theta)``, a scalar whose per-example gradient is the TRAK feature
  before projection: ``phi(z) = P^T grad_theta f(z; theta)``;
- the out-to-loss weight ``Q(z) = -d loss / d f`` at ``z``, which weights train rows in the
  final scores ``tau = mean_m(S_m) * mean_m(Q_m)``.

The built-in :class:`ClassificationTask` uses the margin ``f = logit_y - logsumexp(other
logits)``; for cross-entropy the loss is ``log(1 + exp(-f))``, so ``Q = 1 - p_y``.
:class:`LanguageModelingTask` sums that margin over a sequence's predicted tokens and
averages ``1 - p_t`` over them (``task="language_modeling"``).

Writing your own task means subclassing :class:`Task` and defining ``out_to_loss`` and
either ``outputs`` (preferred) or ``output``. ``outputs`` sees a whole **batch** and returns
``[f(z_1), ..., f(z_B)]`` from one forward pass, example ``b``'s value depending on example
``b`` only; every gradient path can use it (the vmap path through a batch of one). ``output``
sees **one** example (the batch dimension removed, as ``torch.func.vmap`` hands it over) and
serves the vmap path only. The ``model`` callable runs the checkpoint on a **batch**;
``out_to_loss`` sees a whole batch and runs without gradients (never measured, so it may call
the model in any way). Batches can be any pytree of tensors (tuples, dicts), e.g. a text
model's ``{"input_ids": ..., "labels": ...}``::

    class LastTokenMargin(Task):
        def outputs(self, model, batch):
            logits = model(input_ids=batch["input_ids"]).logits[:, -1]   # [B, vocab]
            return batched_margin(logits, batch["labels"])               # [B]
        def out_to_loss(self, model, batch):
            logits = model(input_ids=batch["input_ids"]).logits[:, -1]
            return 1 - logits.softmax(-1).gather(1, batch["labels"][:, None])[:, 0]
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Optional

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

    Subclasses implement :meth:`out_to_loss` and at least one of :meth:`outputs` (batched,
    preferred: every gradient path can use it) and :meth:`output` (one example, under
    ``torch.func.vmap``); each defaults to the other. They may extend :meth:`check_batch` to
    validate batches with a clear message before any work is done.
    """

    #: Recorded in stores, so that reopening one with a different task fails loudly.
    name: str = "custom"
    #: Whether every batch of a loader holds examples of one shape (checked batch to batch).
    #: Set False for variable-length inputs such as dynamically padded text.
    fixed_shapes: bool = True
    #: Rows of the Fisher (``curvature="fisher"``) per example: ``C > 1`` cuts each example's
    #: positions into ``C`` chunks, one sampled-label gradient each (sequence models only).
    fisher_chunks: int = 1

    def __new__(cls, *args: Any, **kwargs: Any):
        if _definer(cls, "output") is Task and _definer(cls, "outputs") is Task:
            raise TypeError(
                f"task class {cls.__name__} must define outputs(self, model, batch) -> [B] "
                "(one batched forward pass; preferred) or output(self, model, example) -> 0-d "
                "(one example, run under torch.func.vmap); it defines neither")
        return super().__new__(cls)

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        """``f(z; theta)`` for one example, a 0-d tensor.

        ``example`` is one element of a batch (the batch dimension removed); ``model(*args,
        **kwargs)`` runs the checkpoint on a batch, so add a batch dimension of 1 yourself.
        Called under ``torch.func.vmap`` and ``grad``: no Python branching on tensor values.

        Default: :meth:`outputs` of a batch of one (every tensor of ``example`` given a batch
        dimension of 1), so a task that defines only ``outputs`` also works on the vmap path,
        provided ``outputs`` can run under ``vmap`` (no ``.item()``, ``int()``, ``bool()`` of
        tensor values).
        """
        if _definer(type(self), "outputs") is Task:     # unreachable: __new__ refuses it
            raise NotImplementedError(f"task {self.name!r} defines neither output nor outputs")
        one = pytree.tree_map(lambda t: t[None] if isinstance(t, torch.Tensor) else t, example)
        f = self.outputs(model, one)
        if not isinstance(f, torch.Tensor) or f.numel() != 1:
            raise ValueError(f"task {self.name!r}: outputs() of a batch of one example must "
                             f"return shape [1], got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        return f.reshape(())

    def log_likelihoods(self, model: ModelFn, batch: Any, draw: "Callable | None" = None
                        ) -> torch.Tensor:
        """``[log p(y_b | x_b)]`` for a batch, shape ``[B]``, with the batch's labels, or with
        labels ``draw(logits)`` (logits ``[B, ..., V]`` -> labels ``[B, ...]``, drawn from the
        model, each example at its own reproducible uniforms) when ``draw`` is given: what
        ``ScoreSettings(curvature="fisher")`` differentiates (see
        :mod:`trak_fast.features.tasks.likelihood`). Built in for classification and language
        modeling; a custom task defines it to use the Fisher curvature."""
        raise NotImplementedError(
            f"task {self.name!r} ({type(self).__name__}) does not define log_likelihoods(model, "
            "batch, draw=None), which curvature='fisher' needs; define it, or use "
            "curvature='kernel'")

    def preferred_features(self) -> Dict[str, Any]:
        """:class:`~trak_fast.FeatureSettings` fields this task prefers where the caller leaves
        the projection unset (see :func:`trak_fast.settings.preferred`). Default: none."""
        return {}

    def preferred_scoring(self, features: Any) -> Dict[str, Any]:
        """:class:`~trak_fast.ScoreSettings` fields this task prefers, for these ``features``,
        where the caller leaves the estimator unset. Default: none (TRAK's kernel)."""
        return {}

    @abc.abstractmethod
    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """``Q_i = -d loss / d f`` at each example of the batch, shape ``[B]`` (no gradient).

        Never measured: the gradient paths run it under ``torch.no_grad()`` (the hooks ignore
        such forward passes), so it may call the model in any way."""

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """``[f(z_1), ..., f(z_B)]`` for a whole batch in one forward pass, shape ``[B]``.

        The hook-based gradient path (``gradients="hooks"``, and ``"auto"`` when available)
        differentiates ``sum_b f(z_b)`` in one ordinary batched backward pass; example ``b``'s
        output must depend on example ``b`` only. A task that does not define it (only
        :meth:`output`) keeps the ``torch.func.vmap`` path: the default stacks
        :meth:`output` over the batch under ``vmap``.
        """
        if _definer(type(self), "output") is Task:      # unreachable: __new__ refuses it
            raise NotImplementedError(f"task {self.name!r} defines neither output nor outputs")
        return torch.func.vmap(lambda example: self.output(model, example),
                               randomness="error")(batch)

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any
                                ) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(f [B], Q [B])``; built-in tasks share one forward pass between the two.

        ``f`` keeps its graph (it is differentiated); ``Q`` is detached. Here ``Q`` comes from
        :meth:`out_to_loss` under ``torch.no_grad()``: a separate forward pass, which the
        hooks that measure the model ignore.
        """
        f = self.outputs(model, batch)
        with torch.no_grad():
            q = self.out_to_loss(model, batch)
        return f, q

    @property
    def has_batched_outputs(self) -> bool:
        """Whether :meth:`outputs` computes this task's ``f`` (the hook path needs it).

        True when the task defines ``outputs`` itself, in the class that defines ``output``
        or below it (``output`` may then be the default, derived from ``outputs``). A
        subclass that overrides :meth:`output` but inherits ``outputs`` from its parent (say,
        a custom task derived from :class:`ClassificationTask`) would differentiate the
        parent's function on the hook path: it keeps the vmap path (see
        :meth:`batched_outputs_problem`).
        """
        return self.batched_outputs_problem() is None

    def batched_outputs_problem(self) -> Optional[str]:
        """``None`` if :meth:`outputs` computes this task's ``f``, else why not (a sentence
        for error messages that ask for the batched form)."""
        cls = type(self)
        outputs_in, output_in = _definer(cls, "outputs"), _definer(cls, "output")
        if outputs_in is Task:
            return (f"task {self.name!r} ({cls.__name__}) defines only output(model, example); "
                    "define outputs(model, batch) -> [B] as well")
        if not issubclass(outputs_in, output_in):
            return (f"task {self.name!r} ({cls.__name__}) overrides output() in "
                    f"{output_in.__name__} but inherits outputs() from {outputs_in.__name__}, "
                    f"which may compute another f; define outputs(model, batch) in "
                    f"{output_in.__name__} too")
        return None

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


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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


def _logits_of(out: Any, what: str) -> torch.Tensor:
    """The logits tensor of a model's output: the tensor itself or its ``.logits`` (Hugging
    Face ``ModelOutput``)."""
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the {what} task needs the model to return a logits tensor or an "
                        f"object with .logits (Hugging Face models), got {type(out).__name__}")
    return logits
