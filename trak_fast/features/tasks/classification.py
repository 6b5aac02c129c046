"""The built-in classification and regression tasks (see :mod:`.base` for what a task is)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.utils import _pytree as pytree

ModelFn = Callable[..., torch.Tensor]

from .base import _INTEGER_DTYPES, Task, _batched_margin, _logits_of, _margin, batch_size_of


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

    def log_likelihoods(self, model: ModelFn, batch: Any, draw=None) -> torch.Tensor:
        """``log softmax(logits_b)[y_b]``; with ``draw``, ``y_b = draw(logits)[b]`` (labels
        drawn from the model)."""
        _, labels = self._split(batch)
        logits = self.logits(model, batch)
        if draw is not None:
            labels = draw(logits)
        return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None].long())[:, 0]

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
