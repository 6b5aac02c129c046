"""The dense hook strategy: exact per-example gradients of each hooked layer, projected.

In the backward pass of :func:`~.hooks.tapped`, each tracked layer hands over its input ``a``
and output gradient ``delta``; its adapter (:mod:`.layers`) turns them into per-example weight
and bias gradients, which go to the :class:`~.writer.FeatureWriter` one slice of the batch at a
time, each slice within ``grad_memory`` bytes. With one dense P, a weight goes through its
adapter's :meth:`~.adapter.LayerAdapter.project_weight`: a matrix weight for the whole batch,
sliced over its rows when it does not fit (so no row of P is generated twice for one batch),
an embedding by its distinct ids only (its gradient has nonzero rows only there).
"""
from __future__ import annotations

import torch

from .hooks import LayerTap
from .plan import TrackedModule
from .writer import FeatureWriter


def dense_tap(tracked: TrackedModule, writer: FeatureWriter, phi: torch.Tensor, batch_size: int,
              budget: int) -> LayerTap:
    """The tap of one layer: its parameters' exact per-example gradients into ``phi``.

    ``budget`` is the number of gradient elements one slice may hold. Whole-batch pieces are
    held by the writer and projected together; the caller calls ``writer.flush(phi)`` after
    the backward pass.
    """
    adapter = tracked.adapter

    def on_grad(inputs: torch.Tensor, grad: torch.Tensor) -> None:
        for role, name in tracked.params:
            numel = writer.sizes[name]
            if role == "weight" and writer.dense and (adapter.rows_of is not None
                                                      or batch_size * numel <= budget // 2):
                # The whole batch at once: a matrix weight too large for the budget is sliced
                # over its rows (each row of P generated once), not over the examples. Half
                # the budget for the piece being formed, half for the pieces held back.
                def project(values, offset, name=name):
                    writer.defer_rows(values.to(phi.dtype), name, offset, phi, budget // 2)
                adapter.project_weight(inputs, grad, project, max_elements=budget // 2)
                continue
            if role == "bias" and writer.dense and batch_size * numel <= budget // 2:
                # Held with the weights: a layer's weight and bias are consecutive rows of P.
                g = adapter.bias_grad(grad)
                writer.defer_rows(g.reshape(batch_size, -1).to(phi.dtype), name, 0, phi, budget // 2)
                continue
            rows = max(1, min(batch_size, budget // numel))
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
