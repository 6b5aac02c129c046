"""The dense hook strategy: exact per-example gradients of each hooked layer, projected.

In the backward pass of :func:`~.hooks.tapped`, each tracked layer hands over its input ``a``
and output gradient ``delta``; its adapter (:mod:`.layers`) turns them into per-example weight
and bias gradients, which go to the :class:`~.writer.FeatureWriter` one slice of the batch at a
time, each slice within ``grad_memory`` bytes. With one dense P, a weight goes through its
adapter's :meth:`~.layers.LayerAdapter.project_weight`, which may have a cheaper exact form (an
embedding's gradient has nonzero rows only at the example's ids).
"""
from __future__ import annotations

import torch

from .hooks import LayerTap
from .plan import TrackedModule
from .writer import FeatureWriter


def dense_tap(tracked: TrackedModule, writer: FeatureWriter, phi: torch.Tensor, batch_size: int,
              budget: int) -> LayerTap:
    """The tap of one layer: its parameters' exact per-example gradients into ``phi``.

    ``budget`` is the number of gradient elements one slice may hold.
    """
    adapter = tracked.adapter

    def on_grad(inputs: torch.Tensor, grad: torch.Tensor) -> None:
        for role, name in tracked.params:
            rows = max(1, min(batch_size, budget // writer.sizes[name]))
            for start in range(0, batch_size, rows):
                stop = min(batch_size, start + rows)
                if role == "weight" and writer.dense:   # the adapter may have a cheaper form
                    def project(values, offset, start=start, stop=stop, name=name):
                        writer.add_rows(values.to(phi.dtype), name, offset, phi[start:stop])
                    adapter.project_weight(inputs[start:stop], grad[start:stop], project)
                    continue
                g = (adapter.weight_grad(inputs[start:stop], grad[start:stop])
                     if role == "weight" else adapter.bias_grad(grad[start:stop]))
                writer.add(g, name, phi, start, stop)
                del g       # before the next slice exists: one slice at a time
    return LayerTap(tracked.module, adapter, lambda inputs: inputs, on_grad)
