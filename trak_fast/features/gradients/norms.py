"""Norm layers, recognised by what they compute: ``y = w * h(x) + b`` along the last dimension.

``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``, and any module whose forward is verified (by a
probe on a copy, :func:`elementwise_affine_kind`) to scale a normalised ``h(x)`` by a vector
weight: Llama's, Qwen2's, Mistral's RMSNorm and their kin. Per-example gradients are per
feature: ``G_b(w) = sum_t delta_bt * h(x_bt)``, ``G_b(b) = sum_t delta_bt``.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .adapter import LayerAdapter


class NormAdapter(LayerAdapter):
    """Elementwise-affine layers ``y = w * h(x) + b`` with ``w``, ``b`` of shape ``[d]`` applied
    along the last dimension (``h``: ``x`` normalized; for ``nn.LayerNorm`` ``w`` may have
    several dimensions, the normalized shape, and ``d`` is its size).

    Per example, with ``delta_t`` the output gradient at token ``t``::

        g_b(w) = sum_t delta_bt * h(x_bt)      g_b(b) = sum_t delta_bt      # [d] each

    ``h`` is the module's own arithmetic: ``F.layer_norm`` without affine for
    ``nn.LayerNorm``, ``F.rms_norm`` for ``nn.RMSNorm``, and for a recognised module
    (:func:`elementwise_affine_kind`, e.g. ``LlamaRMSNorm``) its own forward with ``w = 1`` and
    ``b = 0``, which gives ``h(x)`` exactly, dtype casts included.

    Factored: the gradients are vectors, so a block is ``P_out^T g`` (``k_out`` columns, for the
    weight and for the bias, both with the weight's ``P_out``; ``factored_dims = (d, None)``).
    """

    factored = False                  # legacy flag (see LayerAdapter.factored)

    def __init__(self, module: torch.nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(module)
        self._normalize = normalize

    @property
    def d_in(self) -> int:
        return self.module.weight.numel()

    @property
    def d_out(self) -> int:
        return self.module.weight.numel()

    @property
    def factored_dims(self) -> Tuple[int, Optional[int]]:
        return self.module.weight.numel(), None

    def normalized(self, inputs: torch.Tensor) -> torch.Tensor:
        """``h(x)``, same shape as ``inputs`` (no gradient)."""
        with torch.no_grad():
            return self._normalize(inputs)

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1, self.module.weight.numel())

    def _vector_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        xhat = self.normalized(inputs).to(grad.dtype)
        return (self._flat(grad) * self._flat(xhat)).sum(1)                 # [B, d]

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return self._vector_grad(inputs, grad).reshape(grad.shape[0], *self.module.weight.shape)

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return self._flat(grad).sum(1).reshape(grad.shape[0], *self.module.bias.shape)

    def factored_width(self, role: str, k_out: int, k_in: int) -> int:
        return k_out

    def factored_input(self, inputs: torch.Tensor, p_in: Optional[torch.Tensor]) -> object:
        """The input itself (``h`` is recomputed in the backward pass, one tensor kept)."""
        return inputs

    def factored_features(self, state: object, grad: torch.Tensor, p_out: torch.Tensor,
                          p_in: Optional[torch.Tensor], roles: Sequence[str]
                          ) -> List[torch.Tensor]:
        blocks = []
        for role in roles:
            g = (self._vector_grad(state, grad) if role == "weight"
                 else self._flat(grad).sum(1))                              # [B, d]
            blocks.append(g.to(p_out.dtype) @ p_out)                         # [B, k_out]
        return blocks


#: Verdicts of :func:`elementwise_affine_kind`, one probe per module.
_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, Optional[bool]]" = weakref.WeakKeyDictionary()


def _forward_with(module: torch.nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward on ``x`` with ``weight`` and ``bias`` in place of its parameters.

    Runs on a shallow copy: the module itself, its parameters and hooks are untouched, and no
    hook (the caller's or trak_fast's) fires."""
    probe = copy.copy(module)
    params = {"weight": weight}
    if "bias" in module._parameters:
        params["bias"] = bias
    object.__setattr__(probe, "_parameters", params)
    return probe.forward(x)


def elementwise_affine_kind(module: torch.nn.Module) -> Optional[bool]:
    """Whether ``module`` computes ``y = w * h(x) + b`` along the last dimension of ``x``:
    ``True`` with a bias, ``False`` without, ``None`` if it does not (or cannot be checked).

    Candidates: a module with no submodules and no buffers, whose parameters are exactly a
    1-D ``weight`` (and a ``bias`` of its shape), defined outside ``torch.nn`` (torch's own
    classes are recognised by type). The verdict comes from what the module computes, not its
    name: its forward, run on a copy with random weights ``w1, w2`` (and biases) on random
    ``x`` of shapes ``[2, 3, d]`` (``[2, 5, d]`` if ``d = 3``) and ``[3, d]``, must give
    ``w * h(x) + b`` with ``h(x)`` its output at ``w = 1, b = 0``, to 1e-5 (relative). The per-example weight
    gradient ``sum_t delta_t * h(x_t)`` then holds exactly, whatever ``h`` is (RMSNorm,
    LayerNorm variants, a fixed scale). A look-alike that uses its weight otherwise (``(1 + w)
    * h(x)``, Gemma's, or normalizes after scaling) fails the probe and keeps the vmap path.
    """
    if module in _PROBED:
        return _PROBED[module]
    verdict = _probe(module)
    _PROBED[module] = verdict
    return verdict


def _probe(module: torch.nn.Module) -> Optional[bool]:
    cls = type(module)
    if cls.__module__.startswith("torch.") or module._modules or \
            any(b is not None for b in module._buffers.values()):
        return None
    params = {k: v for k, v in module._parameters.items() if v is not None}
    if set(params) not in ({"weight"}, {"weight", "bias"}):
        return None
    weight = params["weight"]
    if weight.dim() != 1 or weight.numel() < 2 or weight.is_meta or \
            ("bias" in params and params["bias"].shape != weight.shape):
        return None
    has_bias = "bias" in params
    d = weight.numel()
    generator = torch.Generator(device="cpu").manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(weight.device)

    try:
        with torch.no_grad():
            for shape in ((2, 3 if d != 3 else 5, d), (3, d)):    # small: one probe per module
                x = rand(*shape) * 2.0 + 0.5
                ones = torch.ones(d, dtype=torch.float32, device=weight.device)
                h = _forward_with(module, ones, torch.zeros_like(ones) if has_bias else None, x)
                if not isinstance(h, torch.Tensor) or h.shape != x.shape or \
                        not bool(torch.isfinite(h).all()):
                    return None
                for _ in range(2):
                    w = rand(d) + 1.0
                    b = rand(d) if has_bias else None
                    y = _forward_with(module, w, b, x)
                    expected = w * h + (b if has_bias else 0.0)
                    if not isinstance(y, torch.Tensor) or y.shape != x.shape or \
                            not torch.allclose(y.float(), expected, rtol=1e-5,
                                               atol=1e-5 * float(expected.abs().max())):
                        return None
    except Exception:        # a forward that needs other arguments, or other dtypes: not ours
        return None
    return has_bias


def _layer_norm(module: torch.nn.LayerNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(x: torch.Tensor) -> torch.Tensor:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return F.rms_norm(x, module.normalized_shape, None, eps)
    return normalize


def _own_forward(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        ones = torch.ones(weight.shape, dtype=weight.dtype, device=weight.device)
        bias = torch.zeros_like(ones) if "bias" in module._parameters else None
        return _forward_with(module, ones, bias, x)
    return normalize


class LayerNormAdapter(NormAdapter):
    """``torch.nn.LayerNorm`` with an elementwise affine: ``h = F.layer_norm`` without affine."""

    def __init__(self, module: torch.nn.LayerNorm):
        super().__init__(module, _layer_norm(module))


class RMSNormAdapter(NormAdapter):
    """``torch.nn.RMSNorm`` with an elementwise affine: ``h = F.rms_norm`` without weight."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(module, _rms_norm(module))
