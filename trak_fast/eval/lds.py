"""The Linear Datamodeling Score (LDS): how well attribution scores predict retraining.

Given scores ``tau [n_train, n_targets]`` (``tau[i, t]``: how much training example ``i``
raises target ``t``'s output), the TRAK paper (Park et al., 2023, eq. 5) measures them by
counterfactual retraining:

1. Draw ``m`` random subsets ``S_1..S_m`` of the training set, each of size ``alpha * n``.
2. Retrain a model on each subset (same recipe, own seed) and record each target's output
   ``f(z_t; theta_{S_j})`` (for classification: the margin, see :func:`classification_margins`).
3. Predict each output from the scores alone: ``g_j(z_t) = sum_{i in S_j} tau[i, t]``.
4. ``LDS(t) = spearman_j(g_j(z_t), f(z_t; theta_{S_j}))``: the rank correlation across subsets.
5. Report ``mean_t LDS(t)`` with a bootstrap confidence interval over targets.

This module holds only that math (subsets as boolean masks ``[m, n]``, margins ``[m, n_targets]``);
retraining lives with whoever owns the models (``trak_fast.demo``, ``benchmarks/lds.py``).
Everything is computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = [
    "rankdata", "spearman", "draw_subsets", "predicted_margins", "classification_margins",
    "lds_per_target", "bootstrap_ci", "LDSResult", "lds",
]


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, 1-based, ties get their average rank (scipy's "average").

    ``x [..., m]`` -> float64 ``[..., m]``. Example: ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]``.
    """
    x = torch.as_tensor(x).to(torch.float64)
    if x.shape[-1] == 0:
        return x.clone()
    sorted_x, order = torch.sort(x, dim=-1, stable=True)
    m = x.shape[-1]
    positions = torch.arange(1, m + 1, dtype=torch.float64, device=x.device).expand_as(sorted_x)
    # A tie group is a run of equal sorted values; every member gets the mean of the group's positions.
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group_id = torch.cumsum(new_group.to(torch.int64), dim=-1) - 1          # [..., m], 0-based per row
    group_sum = torch.zeros_like(sorted_x).scatter_add_(-1, group_id, positions)
    group_count = torch.zeros_like(sorted_x).scatter_add_(-1, group_id, torch.ones_like(sorted_x))
    avg_rank_sorted = (group_sum / group_count.clamp_min(1)).gather(-1, group_id)
    return torch.empty_like(avg_rank_sorted).scatter_(-1, order, avg_rank_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dimension (ties: average ranks).

    ``rho = pearson(rank(a), rank(b))``, the definition scipy.stats.spearmanr uses. ``a`` and ``b``
    broadcast; returns float64 ``[...]``. A constant row has no ranking and gives NaN.
    """
    a, b = torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b))
    if a.shape[-1] < 2:
        raise ValueError(f"spearman needs at least 2 observations along the last dimension, got shape {tuple(a.shape)}")
    ra, rb = rankdata(a), rankdata(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denom = torch.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    num = (ra * rb).sum(-1)
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.full_like(denom, float("nan")))


def draw_subsets(n: int, m: int, alpha: float = 0.5, *, seed: int = 0) -> torch.Tensor:
    """``m`` random subsets of ``range(n)``, each of exactly ``round(alpha * n)`` elements.

    Returns a bool mask ``[m, n]`` (``mask[j, i]``: example ``i`` is in ``S_j``); subset ``j`` is a pure
    function of ``(seed, j)``, so asking for more subsets later keeps the first ones unchanged.
    """
    if n < 1 or m < 1:
        raise ValueError(f"draw_subsets: n and m must be >= 1, got n={n}, m={m}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"draw_subsets: alpha must be in (0, 1), got {alpha}")
    size = int(round(alpha * n))
    if not 1 <= size <= n:
        raise ValueError(f"draw_subsets: alpha * n = {alpha * n} rounds to an empty or full subset")
    masks = torch.zeros(m, n, dtype=torch.bool)
    for j in range(m):
        g = torch.Generator().manual_seed(1_000_003 * seed + j)
        masks[j, torch.randperm(n, generator=g)[:size]] = True
    return masks


def predicted_margins(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``g[j, t] = sum_{i in S_j} scores[i, t]``: ``masks [m, n] @ scores [n, T]`` in float64 -> ``[m, T]``."""
    scores = torch.as_tensor(scores)
    masks = torch.as_tensor(masks)
    if scores.dim() != 2 or masks.dim() != 2 or masks.shape[1] != scores.shape[0]:
        raise ValueError(
            f"predicted_margins: expected scores [n, T] and masks [m, n], got scores {tuple(scores.shape)} "
            f"and masks {tuple(masks.shape)}")
    return masks.to(torch.float64) @ scores.to(torch.float64)


def classification_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's classification output ``f = logit_y - logsumexp_{c != y} logit_c`` (``= log(p / (1 - p))``).

    ``logits [B, C]``, ``labels [B]`` -> float64 ``[B]``.
    """
    logits = logits.to(torch.float64)
    correct = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def lds_per_target(scores: torch.Tensor, masks: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """``LDS(t) = spearman_j(predicted[j, t], margins[j, t])`` -> float64 ``[T]``.

    ``scores [n, T]``, ``masks [m, n]``, ``margins [m, T]`` (the retrained models' outputs, averaged over
    retrains of the same subset if there are several).
    """
    predicted = predicted_margins(scores, masks)
    margins = torch.as_tensor(margins)
    if margins.shape != predicted.shape:
        raise ValueError(f"lds: margins must be [m, T] = {tuple(predicted.shape)}, got {tuple(margins.shape)}")
    return spearman(predicted.T, margins.to(torch.float64).T)


def bootstrap_ci(values: torch.Tensor, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``, resampling the entries (targets) with replacement.

    NaN entries (targets with a constant output) are dropped first.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    means = v[idx].mean(dim=1)
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return lo.item(), hi.item()


@dataclass
class LDSResult:
    """Mean LDS over targets, its bootstrap interval and the per-target correlations."""

    mean: float
    ci_low: float
    ci_high: float
    per_target: torch.Tensor

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"

    def as_dict(self) -> dict:
        return {"lds": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n_targets": int((~torch.isnan(self.per_target)).sum())}


def lds(scores: torch.Tensor, masks: torch.Tensor, margins: torch.Tensor, *, n_boot: int = 2000,
        level: float = 0.95, seed: int = 0) -> LDSResult:
    """The LDS of ``scores [n, T]`` given subsets ``masks [m, n]`` and retrained ``margins [m, T]``."""
    per_target = lds_per_target(scores, masks, margins)
    lo, hi = bootstrap_ci(per_target, n_boot=n_boot, level=level, seed=seed)
    return LDSResult(torch.nanmean(per_target).item(), lo, hi, per_target)
