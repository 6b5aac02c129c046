"""Which parameters take which per-example gradient strategy (hooks or vmap).

- :mod:`~trak_fast.gradients.vmap`: ``torch.func.vmap(grad(...))``. Any model, any task; one
  forward and backward pass per group of parameters, the group's per-example gradients
  materialized.
- :mod:`~trak_fast.gradients.hooks`: module hooks capture each supported layer's inputs and
  output gradients in one ordinary batched backward pass
  (:mod:`~trak_fast.gradients.layers`: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``).
  From them come either the exact per-example gradients, one layer at a time, or the factored
  projection of :mod:`~trak_fast.gradients.factored`, which never forms them.

:func:`plan_gradients` decides which parameters take which path; the strategies' modules
(:mod:`.dense`, :mod:`.factored`, :mod:`.vmap`) run it, driven by :class:`trak_fast.Featurizer`.
"""
from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from .hooks import Use, hookable_parameters, parameter_uses
from .layers import LayerAdapter, adapter_for

logger = logging.getLogger("trak_fast")

#: Left-out parameter lists already logged (said once per process, not once per checkpoint).
_REPORTED: set = set()


class TrackedModule(NamedTuple):
    """A hooked module, its adapter, the tracked parameters it holds ``[(role, name)]``, and
    ``key``: the canonical name of its weight (the name its factored matrices belong to)."""

    module: torch.nn.Module
    adapter: LayerAdapter
    params: List[Tuple[str, str]]
    key: str


class GradientPlan(NamedTuple):
    """Which differentiated parameters take the hook path and which the vmap path."""

    hooked: List[str]                 # in parameter order
    vmapped: List[str]                # in parameter order
    modules: List[TrackedModule]      # every module with a hooked parameter
    roles: Dict[str, str]             # hooked name -> "weight" | "bias"
    dims: Dict[str, Tuple[int, int]]  # module key -> (d_out, d_in)
    uses: Dict[str, int]              # name -> modules registering it (tied weights: > 1)
    left_out: List[str]               # factored: differentiable parameters without a form


def plan_gradients(model: torch.nn.Module, grad_names: List[str], *, task, gradients: str,
                   projection: str, explicit_grad_wrt: bool) -> GradientPlan:
    """Assigns each parameter of ``grad_names`` to the hook or the vmap path.

    - ``gradients="vmap"``: everything by vmap (``projection="factored"`` is refused).
    - ``"hooks"``: the parameters of supported modules by hooks, the rest by vmap; the task
      must define the batched :meth:`~trak_fast.Task.outputs`.
    - ``"auto"``: as ``"hooks"`` when the task defines ``outputs``, else as ``"vmap"``.

    ``projection="factored"`` keeps only parameters with a factored form (weights and biases
    of supported modules): named in ``grad_wrt`` otherwise is an error; with ``grad_wrt=None``
    the others are left out and logged once.
    """
    batched = task.has_batched_outputs
    if projection == "factored":
        if not batched:
            raise ValueError("projection='factored' needs a task with a batched outputs() "
                             f"method: {task.batched_outputs_problem()}")
    if gradients == "hooks" and not batched:
        raise ValueError("gradients='hooks' needs a task with a batched outputs(model, batch) "
                         f"-> [B] method: {task.batched_outputs_problem()} (or use "
                         "gradients='auto': vmap for this task)")
    use_hooks = gradients == "hooks" or (gradients == "auto" and batched)
    hookable = hookable_parameters(model) if use_hooks else {}
    left_out: List[str] = []
    if projection == "factored":
        hookable = _factorable(hookable)
        left_out = [n for n in grad_names if n not in hookable]
        if left_out and explicit_grad_wrt:
            raise ValueError(f"projection='factored' has no factored form for {left_out[:8]}"
                             f"{' ...' if len(left_out) > 8 else ''}: only weights and biases of "
                             "nn.Linear, nn.Conv2d and transformers' Conv1D modules (used only "
                             "through those modules) are factored; remove them from grad_wrt")
        if left_out and tuple(left_out) not in _REPORTED:
            _REPORTED.add(tuple(left_out))
            sizes = dict((n, p.numel()) for n, p in model.named_parameters())
            share = sum(sizes[n] for n in left_out) / max(1, sum(sizes[n] for n in grad_names))
            logger.warning("projection='factored' leaves out %d parameters (%.1f%% of the "
                           "model) that no supported layer owns: %s%s", len(left_out),
                           100 * share, left_out[:6], " ..." if len(left_out) > 6 else "")
        grad_names = [n for n in grad_names if n in hookable]
        if not grad_names:
            raise ValueError("projection='factored' found no nn.Linear, nn.Conv2d or Conv1D "
                             "parameters to differentiate")
    hooked = [n for n in grad_names if n in hookable]
    vmapped = [n for n in grad_names if n not in hookable]
    canonical = {id(p): n for n, p in model.named_parameters()}
    modules: Dict[int, TrackedModule] = {}
    roles, dims = {}, {}
    for name in hooked:
        for use in hookable[name]:
            roles[name] = use.role
            entry = modules.get(id(use.module))
            if entry is None:
                adapter = adapter_for(use.module)
                key = canonical[id(use.module.weight)]
                entry = TrackedModule(use.module, adapter, [], key)
                modules[id(use.module)] = entry
                dims[key] = adapter.factored_dims
            entry.params.append((use.role, name))
    uses = {name: max(1, len(u)) for name, u in parameter_uses(model).items()}
    return GradientPlan(hooked, vmapped, list(modules.values()), roles, dims, uses, left_out)


def _factorable(hookable: Dict[str, List[Use]]) -> Dict[str, List[Use]]:
    """Hookable parameters whose uses agree on one ``(d_out, d_in)`` (a factored form exists)."""
    keep = {}
    for name, uses in hookable.items():
        adapters = [adapter_for(u.module) for u in uses]
        shapes = {a.factored_dims for a in adapters}
        if len(shapes) == 1:
            keep[name] = uses
    return keep


def without_modules(plan: GradientPlan, modules: List[torch.nn.Module],
                    order: Sequence[str]) -> GradientPlan:
    """``plan`` with the parameters of ``modules`` (and any parameter tied to them) moved to
    the vmap path; ``order`` is the differentiated parameters' model order."""
    moved = {name for t in plan.modules if any(t.module is m for m in modules)
             for _, name in t.params}
    # A tied parameter also registered in a module that did see the batch must move too.
    keep = [t for t in plan.modules if not any(name in moved for _, name in t.params)]
    moved |= {name for t in plan.modules if t not in keep for _, name in t.params}
    rank = {name: i for i, name in enumerate(order)}
    return plan._replace(hooked=[n for n in plan.hooked if n not in moved],
                         vmapped=sorted(plan.vmapped + sorted(moved), key=rank.__getitem__),
                         modules=keep)


def gradient_paths(plan: GradientPlan) -> Dict[str, List[str]]:
    """``{"hooks": [...], "vmap": [...], "left_out": [...]}``: which path each parameter takes."""
    return {"hooks": list(plan.hooked), "vmap": list(plan.vmapped), "left_out": list(plan.left_out)}


def describe_paths(plan: GradientPlan, sizes: Dict[str, int]) -> str:
    """One line: how many parameters, and what share of their elements, take each path."""
    paths = gradient_paths(plan)
    total = max(1, sum(sizes[n] for names in paths.values() for n in names))
    parts = []
    for label, names in paths.items():
        if names:
            share = 100 * sum(sizes[n] for n in names) / total
            listed = "" if label == "hooks" else f" {names[:6]}{' ...' if len(names) > 6 else ''}"
            parts.append(f"{label.replace('_', ' ')}: {len(names)} parameters ({share:.1f}%){listed}")
    return "; ".join(parts)
