"""Per-example gradients, the costly half of featurizing, by one of three strategies.

- :mod:`.vmap`: ``torch.func.vmap(grad(...))``. Any model, any task; one forward and backward
  pass per group of parameters, the group's per-example gradients materialized.
- :mod:`.dense`: module hooks (:mod:`.hooks`) capture each supported layer's inputs and output
  gradients in one ordinary batched backward pass (:mod:`.hook_pass`); the layer's adapter
  (:mod:`.layers`) forms its exact per-example gradients, one layer at a time.
- :mod:`.factored`: the same pass, projected per layer as ``vec(P_out^T G P_in)`` without ever
  forming ``G``.

:func:`~.plan.plan_gradients` decides which parameters take which path; every strategy writes
into the features through one :class:`~.writer.FeatureWriter`.
"""
from .plan import (GradientPlan, TrackedModule, describe_paths, gradient_paths, plan_gradients,
                   without_modules)

__all__ = ["GradientPlan", "TrackedModule", "plan_gradients", "without_modules", "gradient_paths",
           "describe_paths"]
