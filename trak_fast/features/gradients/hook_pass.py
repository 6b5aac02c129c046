"""One batched forward and backward pass with every tracked layer tapped (dense or factored).

The pass differentiates ``F = sum_b f(z_b)`` (the task's batched ``outputs``) through the taps
of :func:`~.hooks.tapped`, so each tap's callback sees its layer's per-example output gradients
(see :mod:`.hooks` for why that is exact). Tracked modules that did not see the batch (a table
applied to a broadcast input) are returned: the caller moves their parameters to vmap and redoes
the batch.
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

from .hooks import LayerTap, backward_through_taps, tapped


def hooked_pass(taps: List[LayerTap], task, run: Callable[..., Any], batch: Any,
                batch_size: int, device: torch.device
                ) -> Tuple[torch.Tensor, List[torch.nn.Module]]:
    """``(Q [B], modules that did not see the batch)`` after running every tap's callbacks."""
    with tapped(taps, device, batch_size) as (anchor, skipped), torch.enable_grad():
        f, q = task.batched_outputs_and_out_to_loss(run, batch)
        if not isinstance(f, torch.Tensor) or f.shape != (batch_size,):
            raise ValueError(f"task.outputs must return shape [{batch_size}], got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        backward_through_taps(f.sum(), anchor)
    return q.detach().reshape(-1).float(), skipped
