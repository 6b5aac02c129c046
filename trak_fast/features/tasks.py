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
from typing import Any, Callable, Dict, Mapping, Optional, Union

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


class ClassificationTask(Task):
    """Multiclass classification: a model giving logits ``[B, C]`` and integer labels.

    ``f = logit_y - logsumexp_{c != y} logit_c`` (the margin) and ``Q = 1 - softmax(logits)_y``,
    MadryLab trak's ``image_classification`` task.

    Batches are either

    - tuples ``(inputs, labels)``: the model is called as ``model(inputs)``, ``inputs`` a
      tensor ``[B, ...]``; or
    - dicts (Hugging Face style) with ``"labels"``: the model is called with every other entry
      as a keyword argument, e.g. ``model(input_ids=..., attention_mask=...,
      token_type_ids=...)`` for ``{"input_ids", "attention_mask", "token_type_ids",
      "labels"}``. The labels are not passed (the model does not compute its own loss).

    ``labels`` are int ``[B]`` in ``[0, C)``. The model returns logits ``[B, C]`` or an object
    with ``.logits`` (``SequenceClassifierOutput``).
    """

    name = "classification"

    @staticmethod
    def _split(batch: Any) -> "tuple[Callable[[ModelFn], Any], torch.Tensor]":
        """``(call, labels)``: ``call(model)`` runs the model on the batch's inputs."""
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return (lambda model: model(**inputs)), batch["labels"]
        inputs, labels = batch
        return (lambda model: model(inputs)), labels

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        one = pytree.tree_map(lambda t: t[None] if isinstance(t, torch.Tensor) else t, example)
        call, label = self._split(one)
        logits = _logits_of(call(model), "classification")
        return _margin(logits[0], label[0])

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        _, labels = self._split(batch)
        return self._q(self.logits(model, batch), labels)

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        _, labels = self._split(batch)
        return _batched_margin(self.logits(model, batch), labels)

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        _, labels = self._split(batch)
        logits = self.logits(model, batch)
        return _batched_margin(logits, labels), self._q(logits.detach(), labels)

    @staticmethod
    def _q(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1).gather(1, labels[:, None].long())[:, 0]
        return 1.0 - p

    @classmethod
    def logits(cls, model: ModelFn, batch: Any) -> torch.Tensor:
        """``[B, C]``: the model's logits on the batch's inputs, checked against its labels."""
        call, labels = cls._split(batch)
        logits = _logits_of(call(model), "classification")
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
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise ValueError(f"{where}: the classification task needs 'labels' in a dict "
                                 f"batch (the other entries are passed to the model as keyword "
                                 f"arguments), got keys {sorted(batch)}")
            if len(batch) < 2:
                raise ValueError(f"{where}: a dict batch needs model inputs besides 'labels' "
                                 f"(e.g. 'input_ids'), got keys {sorted(batch)}")
            for key, value in batch.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{where}: every entry of a dict batch must be a tensor, "
                                    f"got {type(value).__name__} for {key!r}")
            labels = batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, labels = batch
            if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
                raise TypeError(f"{where}: inputs and labels must be tensors, got "
                                f"{type(inputs).__name__} and {type(labels).__name__}")
        else:
            raise TypeError(
                f"{where}: the classification task expects (inputs, labels) batches, got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + " (or dict batches: 'labels' and the model's keyword inputs)"
            )
        if labels.dim() != 1 or labels.dtype not in _INTEGER_DTYPES:
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


#: Label value of a position that is not predicted (Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` (int64) from an attention mask: ``max(cumsum(mask) - 1, 0)``.

    Real tokens are numbered 0, 1, ... in order whichever side the padding is on (as Hugging
    Face's ``generate`` does); padding gets the neighbouring real token's position or 0 (its
    value matters to nothing: padding is masked out)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class LanguageModelingTask(Task):
    r"""Next-token prediction with a causal language model (GPT-2 and the like).

    **Batches** are dicts ``{"input_ids": [B, T], "attention_mask": [B, T] (optional),
    "labels": [B, T] (optional), "position_ids": [B, T] (optional)}`` of integer tensors (the
    mask may be bool), padded on the right or on the left. Labels follow Hugging Face's
    convention: they are aligned with ``input_ids``, the model's logits at position ``t``
    predict ``labels[t + 1]``, and ``-100`` marks a position not to attribute; without
    ``labels`` they are ``input_ids``.

    **The model call.** Without a mask: ``model(input_ids)``. With a mask:
    ``model(input_ids, attention_mask=mask, position_ids=positions)`` where ``positions =
    max(cumsum(mask) - 1, 0)`` counts each sequence's real tokens from 0 (or the batch's own
    ``position_ids``), so that a sequence's real tokens get the positions they have unpadded,
    whichever side the padding is on and however much of it the batch needs. A model whose
    forward takes no ``position_ids`` (``TypeError`` naming it) is called without them: its
    positions, if any, are its own. The model returns logits ``[B, T, V]`` or an object with
    ``.logits`` (Hugging Face models).

    **Predicted tokens.** For a sequence ``z`` with labels ``y`` and mask ``a``, position ``t``
    predicts ``y_{t+1}`` when ``y_{t+1} != -100`` and ``a_t = a_{t+1} = 1``; call that set
    ``S(z)``. Padding and ``-100`` positions are outside it and contribute nothing. Every
    sequence needs ``|S(z)| >= 1``. With
    ``p_t = softmax(logits_t)[y_{t+1}]`` the per-token margin is

        m_t = logits_t[y_{t+1}] - logsumexp_{c != y_{t+1}} logits_t[c] = log(p_t / (1 - p_t)),

    and the training loss, summed cross-entropy, is
    ``L(z) = sum_{t in S} -log p_t = sum_{t in S} log(1 + exp(-m_t))``.

    **f and Q**::

        f(z) = sum_{t in S(z)} m_t                     # the sequence's summed log-odds
        Q(z) = (1 / |S(z)|) sum_{t in S(z)} (1 - p_t)  # the mean per-token weight

    Why these. TRAK's score of a train example stands in for its loss gradient, written
    ``Q(z) grad f(z)`` (the one-step Newton estimate of leaving ``z`` out, with the logistic
    Hessian weights dropped). Here the exact negative loss gradient is
    ``-grad L(z) = sum_t (1 - p_t) grad m_t``, while TRAK uses
    ``Q(z) grad f(z) = mean_t(1 - p_t) * sum_t grad m_t``.

    - *Exact* with one predicted token: ``f`` is then the classification task's margin and
      ``Q = 1 - p``. Also exact when every predicted token has the same ``p_t``.
    - *An approximation* otherwise: the per-token weights ``1 - p_t`` are replaced by their
      mean. The exact form needs one gradient per token, ``|S|`` times the work. Folding the
      weights into ``f`` (``f = sum_t stopgrad(1 - p_t) m_t``, ``Q = 1``) would make target
      features loss gradients rather than margins, and lose the one-token reduction above.
    - *Sum, not mean*, for ``f``. The loss sums over tokens: Hugging Face's token-mean over a
      batch weights every token equally, so each sequence counts by its sum. A sequence's
      feature then grows with its number of predicted tokens, as its share of the loss does.
      ``f = mean_t m_t`` with ``Q = sum_t (1 - p_t)`` gives the same train rows' ``Q grad f``
      but would shrink long sequences in the kernel and in the targets' features.

    **The exact per-token weights**, for reference: ``-grad L(z) = sum_{t in S(z)} (1 - p_t)
    grad m_t``, each token's margin gradient weighted by its own ``1 - p_t``; TRAK's
    ``Q(z) grad f(z)`` above replaces those weights by their mean over ``S(z)``.

    ``f`` is a function of the example alone (no batch statistics), so example ``b``'s
    outputs depend on example ``b`` only. Padding changes nothing as long as the model gives
    real tokens the same logits with and without the padding: true with an attention mask
    and the position ids above, on either side (for a model that takes position ids; one that
    does not must derive its positions from the mask itself for left padding).

    Parameters differentiated through ``torch.func.vmap`` (``gradients="vmap"``, or layers
    the hooks do not support) need a Hugging Face model given an attention mask to use eager
    attention (``GPT2Config(attn_implementation="eager")``): its SDPA mask builder branches on
    the mask's values, which ``vmap`` cannot trace. The hook path calls :meth:`outputs` on the
    whole batch and does not care.
    """

    name = "language_modeling"
    fixed_shapes = False

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        batch = {key: value[None] for key, value in example.items()}
        logits = self._logits(model, batch)
        margins, _, predicted = self._token_terms(logits, batch, check_labels=False)
        return torch.where(predicted, margins, 0.0).sum(-1)[0]

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        margins, _, predicted = self._token_terms(self._logits(model, batch), batch)
        return torch.where(predicted, margins, 0.0).sum(-1)

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        _, p, predicted = self._token_terms(self._logits(model, batch), batch)
        return self._q(p.detach(), predicted)

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        logits = self._logits(model, batch)
        margins, p, predicted = self._token_terms(logits, batch)
        return torch.where(predicted, margins, 0.0).sum(-1), self._q(p.detach(), predicted)

    @staticmethod
    def _q(p: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        weight = predicted.to(torch.float32)
        return ((1.0 - p.float()) * weight).sum(-1) / weight.sum(-1)

    @staticmethod
    def _logits(model: ModelFn, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        kwargs = {} if mask is None else {"attention_mask": mask}
        if "position_ids" in batch:
            out = model(input_ids, position_ids=batch["position_ids"], **kwargs)
        elif mask is None:
            out = model(input_ids)
        else:
            try:
                out = model(input_ids, position_ids=positions_from_mask(mask), **kwargs)
            except TypeError as exc:       # a forward without position_ids: its own positions
                if "unexpected keyword argument 'position_ids'" not in str(exc):
                    raise
                out = model(input_ids, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the language-modeling task needs the model to return logits "
                            f"[B, T, V] or an object with .logits, got {type(out).__name__}")
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise ValueError(f"the language-modeling task needs logits [B, T, V] = "
                             f"[{input_ids.shape[0]}, {input_ids.shape[1]}, V], got shape "
                             f"{tuple(logits.shape)}")
        return logits

    @staticmethod
    def _next_tokens(batch: Dict[str, torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(labels[:, 1:], t in S)``, each ``[B, T - 1]``: what position ``t`` predicts, and whether."""
        labels = batch.get("labels", batch["input_ids"])[:, 1:].long()
        predicted = labels != IGNORE_INDEX
        mask = batch.get("attention_mask")
        if mask is not None:
            predicted = predicted & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        return labels, predicted

    @staticmethod
    def _token_terms(logits: torch.Tensor, batch: Dict[str, torch.Tensor],
                     check_labels: bool = True
                     ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Per-position ``(m_t, p_t, t in S)``, each ``[B, T - 1]``; logits at ``t`` predict ``t + 1``."""
        labels, predicted = LanguageModelingTask._next_tokens(batch)
        vocab = logits.shape[-1]
        if check_labels:   # not under vmap: int() reads values
            used = torch.where(predicted, labels, 0)
            if bool(((used < 0) | (used >= vocab)).any()):
                raise ValueError(f"labels must be -100 or lie in [0, {vocab}) for a model with "
                                 f"{vocab} logits, got values in [{int(used.min())}, {int(used.max())}]")
        target = torch.where(predicted, labels, 0)[..., None]
        logits = logits[:, :-1]
        correct = logits.gather(-1, target)[..., 0]
        is_label = torch.arange(vocab, device=logits.device) == target
        others = torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=-1)
        p = torch.exp(correct.float() - torch.logsumexp(logits.float(), dim=-1))
        return correct - others, p, predicted

    def check_batch(self, batch: Any, where: str) -> int:
        if not isinstance(batch, Mapping):
            raise TypeError(f"{where}: the language-modeling task expects dict batches "
                            f"{{'input_ids': [B, T], 'attention_mask': ..., 'labels': ...}}, "
                            f"got {type(batch).__name__}")
        if "input_ids" not in batch:
            raise ValueError(f"{where}: the language-modeling task needs 'input_ids' in the "
                             f"batch, got keys {sorted(batch)}")
        unknown = sorted(set(batch) - {"input_ids", "attention_mask", "labels", "position_ids"})
        if unknown:
            raise ValueError(f"{where}: unexpected keys {unknown}; the language-modeling task "
                             "reads only 'input_ids', 'attention_mask', 'labels' and "
                             "'position_ids'")
        input_ids = batch["input_ids"]
        for key in [key for key in ("input_ids", "attention_mask", "labels", "position_ids")
                    if key in batch]:
            value = batch[key]
            allowed = _INTEGER_DTYPES + ((torch.bool,) if key == "attention_mask" else ())
            if not isinstance(value, torch.Tensor) or value.dtype not in allowed:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{where}: {key!r} must be an integer tensor"
                                f"{' (or bool)' if key == 'attention_mask' else ''}, got {got}")
            if key == "input_ids" and (value.dim() != 2 or value.shape[1] < 2):
                raise ValueError(f"{where}: 'input_ids' must be [B, T] with T >= 2 (a token "
                                 f"and one to predict), got shape {tuple(value.shape)}")
            if value.shape != input_ids.shape:
                raise ValueError(f"{where}: {key!r} must have the shape of 'input_ids' "
                                 f"{tuple(input_ids.shape)}, got {tuple(value.shape)}")
        mask = batch.get("attention_mask")
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{where}: 'attention_mask' must hold only 0 and 1")
        labels = batch.get("labels")
        if labels is not None:
            bad = labels[(labels < 0) & (labels != IGNORE_INDEX)]
            if bad.numel():
                raise ValueError(f"{where}: 'labels' must be -100 (ignored) or a token id >= 0, "
                                 f"got {int(bad[0])}")
        empty = (~self._next_tokens(batch)[1].any(1)).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(
                f"{where}: sequences {empty[:8]}{' ...' if len(empty) > 8 else ''} predict no "
                "token: every position t + 1 has label -100 or is padding (attention_mask 0 at "
                "t or t + 1); each sequence needs at least one predicted token")
        return batch_size_of(batch, where)


_BUILT_IN: Dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "language_modeling": LanguageModelingTask,
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

