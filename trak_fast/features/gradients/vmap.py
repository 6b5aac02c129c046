"""Per-example gradients by ``torch.func``: ``vmap`` over ``grad`` of a ``functional_call``.

Works for any model and any task that defines the one-example :meth:`Task.output`. Each call
runs one forward and backward pass per *group* of parameters (the parameters outside the
group are constants, so their gradients are never computed) and materializes that group's
per-example gradients, ``B x p_group`` elements: :func:`parameter_groups` cuts the
parameters into consecutive groups that fit a budget, and a group larger than the budget on
its own is run on slices of the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

ModelFactory = Callable[[Mapping[str, torch.Tensor]], Callable[..., torch.Tensor]]


def parameter_groups(sizes: Sequence[int], max_elements: int) -> List[List[int]]:
    """Consecutive parameter groups whose total size is at most ``max_elements`` (>= 1 each)."""
    groups: List[List[int]] = []
    current: List[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and total + size > max_elements:
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, batch)


def per_example_grads(model_with: ModelFactory, task, params: Mapping[str, torch.Tensor],
                      group: Sequence[str], batch: Any) -> Dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: per-example gradients of ``task.output`` w.r.t. ``group`` only."""
    frozen = {n: t for n, t in params.items() if n not in group}

    def output(wrt: Dict[str, torch.Tensor], example: Any) -> torch.Tensor:
        return task.output(model_with({**frozen, **wrt}), example)

    wrt = {n: params[n] for n in group}
    grads = torch.func.vmap(torch.func.grad(output), in_dims=(None, 0), randomness="error")(wrt, batch)
    return {n: own_memory(grads[n].detach()) for n in group}


def own_memory(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with its own memory for every element.

    ``torch.func.grad`` returns the gradient of a parameter the output does not depend on (one
    outside the forward, or behind a ``detach``) as zeros expanded with stride 0. Such a tensor
    overlaps itself, and ``project`` refuses inputs whose overlap with ``out`` it cannot rule
    out; the copy is no larger than an ordinary gradient. The all-zero features that result
    are then reported by :func:`trak_fast.kernel.check_kernel`.
    """
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return grad.contiguous()
    return grad


def vmap_features(model_with: ModelFactory, task, params: Mapping[str, torch.Tensor],
                  names: Sequence[str], uses: Mapping[str, int], batch: Any, batch_size: int,
                  phi: torch.Tensor, writer, budget: int) -> None:
    """The vmap strategy: per-example gradients of ``names`` into ``phi`` by ``writer``.

    Groups of parameters within ``budget`` gradient elements per example row; a group larger
    than the budget on its own runs on slices of the batch.
    """
    # torch.func forms each use's gradient of a tied parameter before summing them, so a
    # parameter registered in u modules counts u times against the budget.
    sizes = [params[n].numel() * uses[n] for n in names]
    for group in parameter_groups(sizes, max(1, budget // batch_size)):
        group_names = [names[i] for i in group]
        rows = max(1, min(batch_size, budget // sum(sizes[i] for i in group)))
        for start in range(0, batch_size, rows):
            stop = min(batch_size, start + rows)
            part = batch if (start, stop) == (0, batch_size) else slice_batch(batch, start, stop)
            grads = per_example_grads(model_with, task, params, group_names, part)
            writer.add_many(grads, group_names, phi, start, stop)
            del grads       # before the next slice's gradients exist
