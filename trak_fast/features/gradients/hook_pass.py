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


class _SharedCall:
    """The model, run once: a second call with the same arguments returns the first call's
    output (its graph included), so several outputs share one forward pass. A call with
    other arguments runs the model again (correct, just not shared)."""

    def __init__(self, run: Callable[..., Any]):
        self.run, self.key, self.out = run, None, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (tuple(map(id, args)), tuple((k, id(v)) for k, v in sorted(kwargs.items())))
        if self.key != key:
            self.key, self.out = key, self.run(*args, **kwargs)
        return self.out


def hooked_passes(taps: List[LayerTap], outputs: List[Callable[[Callable[..., Any]], torch.Tensor]],
                  run: Callable[..., Any], batch_size: int, device: torch.device,
                  before_backward: Callable[[int], None]) -> List[torch.nn.Module]:
    """One forward pass, then one backward pass per function of ``outputs`` (each maps the
    model to ``[B]``, e.g. log-likelihoods of two label sets), ``before_backward(i)`` called
    before the ``i``-th (to route the taps' callbacks); returns the modules that did not see
    the batch, as :func:`hooked_pass` does."""
    shared = _SharedCall(run)
    with tapped(taps, device, batch_size) as (anchor, skipped), torch.enable_grad():
        values = [out(shared) for out in outputs]
        for f in values:
            if not isinstance(f, torch.Tensor) or f.shape != (batch_size,):
                raise ValueError(f"outputs must have shape [{batch_size}], got "
                                 f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        for i, f in enumerate(values):
            before_backward(i)
            if f.requires_grad:
                torch.autograd.grad(f.sum(), anchor, allow_unused=True,
                                    retain_graph=i < len(values) - 1)
    return skipped
