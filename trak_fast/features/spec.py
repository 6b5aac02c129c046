"""What the features of a model are, before any checkpoint is seen: the feature space.

From the model, the task and the :class:`~trak_fast.settings.FeatureSettings` come which
parameters are differentiated and by which strategy, how many features there are, and where
each parameter's gradient goes (its ``offset``): its first row of P for a dense projection,
of its layer's ``P_l`` for ``projection="per_layer"``, its first column for raw gradients and
the factored projection.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..settings import FeatureSettings, auto_factored_dims
from .gradients import plan_gradients
from .gradients.factored import factored_layout, factored_widths
from .layout import FeatureBlock, layer_blocks, parameter_layout, per_layer_dims
from .model import grad_param_names
from .tasks import Task


def model_width(modules) -> int:
    """The median over the factored matrix layers (``TrackedModule`` entries of a plan) of
    ``min(d_out, d_in)``: a transformer's hidden size (vector weights, e.g. norms, do not
    count; without a matrix layer, the median vector length)."""
    sides = [min(d_out, d_in) for d_out, d_in in (t.adapter.factored_dims for t in modules)
             if d_in is not None]
    sides = sides or [t.adapter.factored_dims[0] for t in modules]
    return sorted(sides)[(len(sides) - 1) // 2]


class FeatureSpec:
    """The feature space of ``model`` under ``task`` and ``settings``.

    ``plan`` (which parameters take hooks or vmap), ``grad_names`` (the differentiated
    parameters, model order), ``factored_dims`` (``"auto"`` resolved), ``num_grad_params``,
    ``proj_dim`` (``None`` for raw gradients
    and for the factored projection), ``num_features`` (``k``), ``offsets`` (see the module
    docstring), ``layer_columns`` (``per_layer``: layer -> its columns) and ``layout``: the
    :class:`FeatureBlock` of each parameter (raw, factored), of each layer (per_layer), or one
    block ``"dense"``.
    """

    def __init__(self, model: torch.nn.Module, task: Task, settings: FeatureSettings):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.settings = settings
        projection = settings.projection
        self.factored_dims = settings.factored_dims
        self.plan = plan_gradients(model, grad_param_names(model, settings.grad_wrt), task=task,
                                   gradients=settings.gradients, projection=projection,
                                   explicit_grad_wrt=settings.grad_wrt is not None)
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        self.grad_names = sorted(self.plan.hooked + self.plan.vmapped, key=order.__getitem__)
        self.sizes = {name: p.numel() for name, p in model.named_parameters()}
        self.num_grad_params = sum(self.sizes[n] for n in self.grad_names)
        if projection == "factored":
            if self.factored_dims == "auto":
                self.factored_dims = auto_factored_dims(model_width(self.plan.modules))
            self.proj_dim = None
            self.layout = factored_layout(self.grad_names, self.plan.roles, self.factored_dims,
                                          factored_widths(self.plan.modules, self.factored_dims))
        else:
            self.proj_dim = settings.proj_dim
            self.layout = parameter_layout(self.grad_names, [self.sizes[n] for n in self.grad_names])
        self.offsets: Dict[str, int] = {block.name: block.start for block in self.layout}
        self.num_features = self.layout[-1].stop
        self.layer_columns: Dict[str, Tuple[int, int]] = {}
        if projection == "per_layer":
            self._split_by_layer(settings.proj_dim)
        elif self.proj_dim is not None:
            self.num_features = self.proj_dim
            self.layout = [FeatureBlock("dense", 0, self.proj_dim, "dense")]

    def _split_by_layer(self, proj_dim: int) -> None:
        layers = layer_blocks(self.layout)
        dims = per_layer_dims({b.layer: b.stop - b.start for b in layers}, proj_dim)
        if len(dims) != len(layers):
            raise ValueError("projection='per_layer' needs each layer's parameters to be "
                             "consecutive in the model's parameter order")
        self.offsets = {b.name: b.start - next(l.start for l in layers if l.layer == b.layer)
                        for b in self.layout}
        self.layout, column = [], 0
        for block in layers:
            k_l = dims[block.layer]
            self.layout.append(FeatureBlock(block.layer, column, column + k_l, block.layer))
            self.layer_columns[block.layer] = (column, column + k_l)
            column += k_l
        self.num_features = proj_dim
