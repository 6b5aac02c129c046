"""The ``k`` strongest proponents and opponents of each target, in one pass over row blocks.

A score matrix ``S [n, t]`` (train rows x targets, usually the ``scores.npy`` memmap a
:class:`~trak_fast.TRAK` store writes) is read ``block_rows`` rows at a time. For each block,
``torch.topk`` along the rows gives at most ``k`` candidates per target, which are merged with
the running best ``k``; the same for the smallest scores. Memory is ``O(t * (k + block_rows))``
whatever ``n`` is: the ``n x t`` matrix is never held, only paged through.

Order: per target, proponents by decreasing score and opponents by increasing score; equal
scores are listed by increasing train index (which of several scores tied at the ``k``-th
place is kept is unspecified, as for ``torch.topk``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

#: Bytes of one row block of scores (float32) read at a time.
DEFAULT_BLOCK_BYTES = 64 << 20


class TopK(NamedTuple):
    """Per target ``j``: ``proponents[j]`` the train indices with the largest scores (best
    first), ``proponent_scores[j]`` their scores; ``opponents`` / ``opponent_scores`` the
    smallest (most negative first). All ``[t, k]`` CPU tensors (int64 and float32)."""

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


def _merge(best: Optional[Tuple[torch.Tensor, torch.Tensor]], values: torch.Tensor,
           indices: torch.Tensor, k: int, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if best is not None:
        values, indices = torch.cat([best[0], values]), torch.cat([best[1], indices])
    keep = min(k, values.shape[0])
    values, position = torch.topk(values, keep, dim=0, largest=largest, sorted=False)
    return values, indices.gather(0, position)


def _ordered(values: torch.Tensor, indices: torch.Tensor, largest: bool
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[t, k]``: by score (decreasing if ``largest``), ties by increasing index."""
    values, indices = values.T, indices.T
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=largest, stable=True)
    return values.gather(1, by_value).contiguous(), indices.gather(1, by_value).contiguous()


def _raise_non_finite(block: torch.Tensor, start: int) -> None:
    row, column = (int(x) for x in (~torch.isfinite(block)).nonzero()[0])
    raise ValueError(f"scores[{start + row}, {column}] is {block[row, column].item()}; "
                     "top-k needs finite scores")


def top_k(scores: Union[np.ndarray, torch.Tensor], k: int, *,
          block_rows: Optional[int] = None) -> TopK:
    """The ``k`` largest and ``k`` smallest scores of each column of ``scores [n, t]``.

    Args:
        scores: ``[n, t]`` (a numpy array or memmap, or a CPU tensor); read row block by row
            block, never whole.
        k: how many proponents and opponents per target, ``1 <= k <= n``.
        block_rows: rows read at a time (default: as many as fit in 64 MiB of float32).
    Raises:
        ValueError: for a bad ``k`` or ``block_rows``, a matrix that is not 2-D, or a score
            that is NaN or infinite (naming its row and column).
    """
    shape = tuple(getattr(scores, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"scores must be a 2-D [n, t] matrix, got shape {shape}")
    n, t = shape
    if n == 0 or t == 0:
        raise ValueError(f"scores must have at least one row and one column, got shape {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of train rows), got {k!r}")
    if block_rows is None:
        block_rows = max(k, DEFAULT_BLOCK_BYTES // (4 * t))
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    high = low = None
    # One buffer for every block (no allocation per block, so no heap growth with n); a
    # non-finite score shows up in the block's top-k (NaN and +inf among the largest, -inf
    # among the smallest), so only those [k, t] results are checked.
    buffer = torch.empty(min(block_rows, n), t, dtype=torch.float32)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = buffer[:stop - start]
        source = scores[start:stop]
        if isinstance(source, torch.Tensor):
            block.copy_(source)
        else:
            np.copyto(block.numpy(), source, casting="same_kind")
        keep = min(k, stop - start)
        for largest in (True, False):
            values, indices = torch.topk(block, keep, dim=0, largest=largest, sorted=False)
            if not torch.isfinite(values).all():
                _raise_non_finite(block, start)
            indices += start
            if largest:
                high = _merge(high, values, indices, k, True)
            else:
                low = _merge(low, values, indices, k, False)
    pro_scores, pro = _ordered(*high, largest=True)
    opp_scores, opp = _ordered(*low, largest=False)
    return TopK(pro, pro_scores, opp, opp_scores)
