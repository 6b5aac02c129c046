"""Log-likelihood tasks for the Fisher curvature (``ScoreSettings(curvature="fisher")``).

For a task whose loss is a negative log-likelihood (classification, language modeling):

- :class:`LogLikelihoodTask`: ``f(z) = log p(y | x)`` with the example's own labels (summed over a
  sequence's predicted tokens), so ``grad f = -grad loss``: the train rows of an influence
  function.
- :class:`SampledLogLikelihoodTask`: the same with labels ``yhat`` drawn from the model's own
  softmax at every predicted position. Because the draws are independent given the logits,
  ``E[grad f grad f^T] = sum_t J_t^T (diag(p_t) - p_t p_t^T) J_t``: the true Fisher (= the
  Gauss-Newton matrix of the loss), each token with its full rank ``V - 1`` curvature, from one
  backward pass per example. TRAK's kernel ``sum_i Q_i phi_i phi_i^T`` keeps one direction per
  example instead.

The draws are reproducible per example: ``yhat`` comes from the inverse CDF of ``p_t`` at uniforms
hashed from a key of the example's own inputs and the seed (:func:`example_keys`, computed before
the pass; :func:`keyed_uniforms`, integer arithmetic that runs under ``vmap`` too), so an example
gets the same labels in any batch, on any rank, on either gradient path and after a resume.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from .base import ModelFn, Task


_M32 = 0xFFFFFFFF


def example_keys(batch: Any, seed: int) -> torch.Tensor:
    """``[B]`` int64 keys: row ``b`` a hash of ``seed`` and the bytes of example ``b``'s tensors
    (every tensor of the batch but ``"labels"``) only. Computed outside any ``vmap``."""
    if isinstance(batch, Mapping):
        leaves = [v for k, v in sorted(batch.items()) if k != "labels" and isinstance(v, torch.Tensor)]
    else:
        leaves = [t for t in pytree.tree_leaves(batch[0] if isinstance(batch, (tuple, list)) else batch)
                  if isinstance(t, torch.Tensor)]
    flat = [t.detach().reshape(t.shape[0], -1).cpu().contiguous() for t in leaves]
    keys = []
    for b in range(flat[0].shape[0]):
        digest = hashlib.blake2b(digest_size=8, key=int(seed).to_bytes(8, "little"))
        for t in flat:
            digest.update(t[b].numpy().tobytes())
        keys.append(int.from_bytes(digest.digest(), "little") >> 1)
    return torch.tensor(keys, dtype=torch.int64, device=leaves[0].device)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (in int64: products stay below 2**59, shifts of non-negatives)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def keyed_uniforms(keys: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., width]`` uniforms in ``(0, 1)`` (float64), entry ``j`` of row ``b`` a hash of
    ``keys[b]`` and ``j``: plain integer tensor arithmetic, so it runs under ``vmap``."""
    position = torch.arange(width, dtype=torch.int64, device=keys.device)
    low, high = (keys & _M32)[..., None], ((keys >> 32) & _M32)[..., None]
    x = _mix32(_mix32((low + position * 0x9E3779B9) & _M32) ^ high)
    return (x.double() + 0.5) / 2.0**32


def example_uniforms(batch: Any, seed: int, width: int) -> torch.Tensor:
    """``[B, width]`` uniforms of :func:`keyed_uniforms` at the batch's :func:`example_keys`."""
    return keyed_uniforms(example_keys(batch, seed), width)


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``yhat [...]`` drawn from ``softmax(logits [..., V])`` by the inverse CDF at ``uniforms [...]``."""
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return drawn.clamp(max=logits.shape[-1] - 1)


def drawing(keys: torch.Tensor):
    """``draw(logits [B, ..., V]) -> labels [B, ...]``: each example's labels drawn from its
    logits at its own uniforms (:func:`keyed_uniforms` of its key)."""
    def draw(logits: torch.Tensor) -> torch.Tensor:
        width = 1
        for size in logits.shape[1:-1]:
            width *= size
        return sample_labels(logits, keyed_uniforms(keys, width).reshape(logits.shape[:-1]))
    return draw


class _Wrapped(Task):
    """Shares the wrapped task's batch checks; ``Q = 1`` (the loss is ``-f`` itself)."""

    def __init__(self, task: Task):
        self.task = task
        self.fixed_shapes = task.fixed_shapes

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return torch.ones(self.task.check_batch(batch, "batch"))

    def check_batch(self, batch: Any, where: str) -> int:
        return self.task.check_batch(batch, where)


class LogLikelihoodTask(_Wrapped):
    """``f(z) = log p(y | x)`` of ``task``'s labels (see the module docstring)."""

    def __init__(self, task: Task):
        super().__init__(task)
        self.name = f"{task.name}/log_likelihood"

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.task.log_likelihoods(model, batch)


class SampledLogLikelihoodTask(_Wrapped):
    """``f(z) = log p(yhat | x)``, ``yhat`` drawn from the model (see the module docstring).

    Its batches are ``(batch, keys)`` (:meth:`keyed`): each example's key travels with it, so
    its draw is the same on the hook path and under ``vmap``, in any batch and after a resume."""

    def __init__(self, task: Task, seed: int):
        super().__init__(task)
        self.seed = seed
        self.name = f"{task.name}/sampled_log_likelihood"

    def keyed(self, batch: Any) -> tuple:
        """``(batch, example_keys(batch, seed))``: this task's form of a batch."""
        return batch, example_keys(batch, self.seed)

    def outputs(self, model: ModelFn, keyed: Any) -> torch.Tensor:
        batch, keys = keyed
        return self.task.log_likelihoods(model, batch, draw=drawing(keys))

    def out_to_loss(self, model: ModelFn, keyed: Any) -> torch.Tensor:
        return super().out_to_loss(model, keyed[0])

    def check_batch(self, keyed: Any, where: str) -> int:
        return self.task.check_batch(keyed[0], where)
