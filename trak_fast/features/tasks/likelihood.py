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
seeded by the hash of the example's own inputs and the seed, so an example gets the same labels
in any batch, on any rank, and after a resume.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from .base import ModelFn, Task


def example_uniforms(batch: Any, seed: int, width: int) -> torch.Tensor:
    """``[B, width]`` uniforms in ``[0, 1)`` (float64): row ``b`` a function of ``seed`` and the
    bytes of example ``b``'s tensors (every tensor of the batch but ``"labels"``) only."""
    if isinstance(batch, Mapping):
        leaves = [v for k, v in sorted(batch.items()) if k != "labels" and isinstance(v, torch.Tensor)]
    else:
        leaves = [t for t in pytree.tree_leaves(batch[0] if isinstance(batch, (tuple, list)) else batch)
                  if isinstance(t, torch.Tensor)]
    flat = [t.detach().reshape(t.shape[0], -1).cpu().contiguous() for t in leaves]
    rows = []
    for b in range(flat[0].shape[0]):
        digest = hashlib.blake2b(digest_size=8, key=int(seed).to_bytes(8, "little"))
        for t in flat:
            digest.update(t[b].numpy().tobytes())
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        rows.append(torch.rand(width, generator=generator, dtype=torch.float64))
    return torch.stack(rows).to(leaves[0].device)


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``yhat [...]`` drawn from ``softmax(logits [..., V])`` by the inverse CDF at ``uniforms [...]``."""
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return drawn.clamp_(max=logits.shape[-1] - 1)


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
    """``f(z) = log p(yhat | x)``, ``yhat`` drawn from the model (see the module docstring)."""

    def __init__(self, task: Task, seed: int):
        super().__init__(task)
        self.seed = seed
        self.name = f"{task.name}/sampled_log_likelihood"

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.task.log_likelihoods(model, batch, sample_seed=self.seed)
