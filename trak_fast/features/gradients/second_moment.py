"""Per-example gradients divided by the optimizer's second moment (``optimizer_state=``).

Given a checkpoint's Adam state (a ``torch.optim`` state dict, or ``{name: v}``), every
per-example gradient is divided elementwise, before it is projected, by the denominator of
Adam's update at that checkpoint::

    g~ = g / (sqrt(v_hat) + eps),     v_hat = exp_avg_sq / (1 - beta2^step)

(``max_exp_avg_sq`` with ``amsgrad``; ``beta2``, ``eps`` and ``step`` from the state dict; a
plain ``{name: v}`` mapping is taken as ``v_hat`` itself, with ``eps`` given). ``g~`` is the
direction Adam would move the parameters for the gradient ``g``: the normalization of
TrackStar (Chang et al., 2024) and of the LESS data selector (Xia et al., 2024). Train
examples, targets and sampled-label (Fisher) gradients are all transformed alike; it is the
gradient with respect to ``phi`` where ``theta = phi / (sqrt(v_hat) + eps)``.

Where the gradient is formed (dense, ``per_layer`` and raw features, hooks or vmap), the
division is exact: :class:`~.writer.FeatureWriter` scales each piece before projecting it.
The factored projection never forms ``G [d_out, d_in]`` of a weight; it uses Adafactor's
rank-one factorization (Shazeer & Stern, 2018) of ``V = v_hat + eps^2``::

    V ~ r c^T / s,     r = V 1 (row sums),  c = V^T 1 (column sums),  s = 1^T V 1

whose elementwise inverse square root is again rank one, ``V^-1/2 ~ a b^T`` with
``a = s^1/4 / sqrt(r)``, ``b = s^1/4 / sqrt(c)``, so::

    P_out^T (G * a b^T) P_in = (diag(a) P_out)^T G (diag(b) P_in)

is the factored feature with the rows of ``P_out`` and ``P_in`` scaled: no extra cost per
example (:class:`~.factored.FactoredMatrices`). Vector weights (norms) and biases have their
exact ``1 / sqrt(v_hat + eps^2)`` there (a bias is projected on its own, with the unscaled
``P_out``). In the factored form ``1 / sqrt(v_hat + eps^2)`` stands for ``1 / (sqrt(v_hat) +
eps)``; the two differ by less than a factor ``sqrt(2)`` and only where ``v_hat ~ eps^2``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

#: eps of a plain ``{name: v}`` mapping: torch.optim.Adam's default.
DEFAULT_EPS = 1e-8


class SecondMoments:
    """``1 / (sqrt(v_hat) + eps)`` of each featurized parameter, and its factored form.

    ``inverse[name]`` has the parameter's shape (float32 or float64 like the model); ``eps``
    is each parameter's ``eps``. Nothing else is kept: :meth:`factors` recovers ``v_hat``."""

    def __init__(self, v_hat: Mapping[str, torch.Tensor], eps: Mapping[str, float],
                 device: torch.device, dtype: torch.dtype):
        self.inverse: Dict[str, torch.Tensor] = {}
        self.eps = {name: eps[name] for name in v_hat}
        for name, v in v_hat.items():
            v = v.detach().to(device=device, dtype=torch.float64).clamp_min(0)
            self.inverse[name] = (1.0 / (v.sqrt() + eps[name])).to(dtype)

    @classmethod
    def from_state(cls, state: Any, model: torch.nn.Module, names: Sequence[str],
                   device: torch.device, dtype: torch.dtype, eps: Optional[float] = None,
                   where: str = "optimizer_state") -> "SecondMoments":
        """From a ``torch.optim`` state dict (``opt.state_dict()`` of Adam, AdamW or kin: its
        parameters are matched to ``model.named_parameters()`` by the ``param_names`` it saved,
        else by position, which must cover every parameter of the model) or from ``{name:
        v_hat}``. ``names`` are the featurized parameters: each must have a second moment of
        its own shape."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if isinstance(state, Mapping) and "state" in state and "param_groups" in state:
            v_hat, eps_of = _from_optimizer(state, list(shapes), where)
        elif isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
            value = DEFAULT_EPS if eps is None else float(eps)
            v_hat, eps_of = dict(state), {n: value for n in state}
        else:
            raise TypeError(f"{where} must be a torch.optim state dict (optimizer.state_dict() "
                            "of Adam/AdamW) or a {parameter name: second moment tensor} mapping, "
                            f"got {type(state).__name__}")
        missing = [n for n in names if n not in v_hat]
        if missing:
            raise ValueError(f"{where} has no second moment for {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}; every featurized parameter "
                             "needs one (leave the others out with grad_wrt=)")
        for n in names:
            if tuple(v_hat[n].shape) != shapes[n]:
                raise ValueError(f"{where}: the second moment of {n!r} has shape "
                                 f"{tuple(v_hat[n].shape)}, the parameter {shapes[n]}")
            if not bool(torch.isfinite(v_hat[n]).all()) or bool((v_hat[n] < 0).any()):
                raise ValueError(f"{where}: the second moment of {n!r} has negative or "
                                 "non-finite entries")
        return cls({n: v_hat[n] for n in names}, eps_of, device, dtype)

    def scale(self, grad: torch.Tensor, name: str) -> torch.Tensor:
        """``grad [B, *shape] / (sqrt(v_hat) + eps)`` of parameter ``name``."""
        inv = self.inverse[name]
        return grad * inv.reshape(1, *inv.shape).to(grad.dtype)

    def scale_flat(self, values: torch.Tensor, name: str, first: int) -> torch.Tensor:
        """``values [B, m]``: flat entries ``first .. first + m - 1`` of ``name``'s gradient."""
        inv = self.inverse[name].reshape(-1)[first:first + values.shape[1]]
        return values * inv.to(values.dtype)

    def factors(self, name: str, as_matrix) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(a [d_out], b [d_in])`` with ``a b^T`` the rank-one inverse root of ``V`` (module
        docstring); ``as_matrix`` gives the weight's ``[d_out, d_in]`` view (a vector weight:
        ``(1 / sqrt(V), None)``, exact). ``V = v_hat + eps^2``, with ``sqrt(v_hat) = 1 /
        inverse - eps`` (in float64; exact up to the rounding of ``inverse``)."""
        eps = self.eps[name]
        root_v = (1.0 / self.inverse[name].double() - eps).clamp_min(0)
        v = root_v.square() + eps ** 2
        if v.dim() == 1:
            return v.rsqrt(), None
        v = as_matrix(v)
        total = v.sum()
        root = total.sqrt().sqrt()
        return root * v.sum(1).rsqrt(), root * v.sum(0).rsqrt()


def _from_optimizer(state: Mapping[str, Any], names: List[str], where: str
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """``({name: v_hat}, {name: eps})`` of an Adam-style state dict."""
    ids: List[Any] = []
    saved_names: List[Optional[str]] = []
    group_of: Dict[Any, Mapping[str, Any]] = {}
    for group in state["param_groups"]:
        group_names = group.get("param_names")
        for i, pid in enumerate(group["params"]):
            ids.append(pid)
            saved_names.append(group_names[i] if group_names else None)
            group_of[pid] = group
    if all(saved_names):
        name_of = dict(zip(ids, saved_names))
    elif len(ids) == len(names):
        name_of = dict(zip(ids, names))         # optimizer built on model.parameters()
    else:
        raise ValueError(f"{where} covers {len(ids)} parameters and saved no param_names, but "
                         f"the model has {len(names)}: parameters cannot be matched by position. "
                         "Build the optimizer on model.named_parameters() (torch >= 2.5 saves "
                         "the names) or pass {name: exp_avg_sq / (1 - beta2^step)} instead")
    v_hat: Dict[str, torch.Tensor] = {}
    eps: Dict[str, float] = {}
    for pid, entry in state["state"].items():
        name, group = name_of.get(pid), group_of.get(pid)
        if name is None or group is None:
            continue
        key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in entry else "exp_avg_sq"
        if key not in entry or "betas" not in group:
            raise ValueError(f"{where}: parameter {name!r} has no {key} (an Adam-style "
                             f"optimizer's state is needed; its keys are {sorted(entry)})")
        step = float(entry.get("step", 0))
        if step <= 0:
            raise ValueError(f"{where}: parameter {name!r} has step {step}: the optimizer has "
                             "not taken a step, so it has no second moment yet")
        beta2 = float(group["betas"][1])
        v_hat[name] = entry[key] / (1.0 - beta2 ** step)
        eps[name] = float(group.get("eps", DEFAULT_EPS))
    return v_hat, eps
