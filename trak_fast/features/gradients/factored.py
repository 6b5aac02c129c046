"""The factored projection: per-layer features ``vec(P_out^T G P_in)`` without forming ``G``.

For a supported layer with per-example weight gradient ``G = sum_t delta_t a_t^T``
(``[d_out, d_in]``, see :mod:`trak_fast.gradients.layers`) and two random matrices
``P_out [d_out, k_out]`` and ``P_in [d_in, k_in]`` (entries of variance ``1/k_out`` and
``1/k_in``, from the same definition as every trak_fast matrix)::

    P_out^T G P_in = sum_t (P_out^T delta_t) (P_in^T a_t)^T        # [k_out, k_in]

so the feature costs ``O(T (d_in k_in + d_out k_out + k_out k_in))`` per example instead of
the ``O(d_in d_out k)`` of a dense projection of ``vec(G)``. It is norm preserving on
average: with ``E[P P^T] = I`` for both independent matrices,
``E ||P_out^T G P_in||_F^2 = E tr(P_in^T G^T G P_in) = ||G||_F^2``. The bias gradient
``sum_t delta_t`` gets ``P_out^T sum_t delta_t`` (``k_out`` features), with the same ``P_out``.

Seeds. The matrices of the parameter named ``name`` under the checkpoint seed ``s`` (already
``model_seed(seed, model_id)``) have seeds ``model_seed(s, h(name + "/out"))`` and
``model_seed(s, h(name + "/in"))``, ``h`` the first 8 bytes of BLAKE2b of the UTF-8 name, top
bit cleared. They depend on the name only, so adding or removing a layer changes no other
layer's matrices.

Layout. The features are the blocks of the tracked parameters in the model's parameter
order: a weight's block holds ``vec(P_out^T G P_in)`` row-major (``k_out x k_in``), a bias's
block ``k_out`` values; :class:`FeatureBlock` records each block's name and columns.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

import torch

from ..layout import FeatureBlock, parameter_layout
from ...ops.projection import model_seed, projection_matrix


def name_seed(seed: int, name: str) -> int:
    """``model_seed(seed, h(name))``: the seed of a matrix that belongs to ``name``."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return model_seed(seed, int.from_bytes(digest, "little") & ((1 << 63) - 1))


class FactoredMatrices:
    """``P_out`` and ``P_in`` of every tracked weight (``P_out`` of a bias is its weight's)."""

    def __init__(self, seed: int, kind: str, factored_dims: Tuple[int, int],
                 dims: Dict[str, Tuple[int, int]], device: torch.device, dtype: torch.dtype):
        """``dims[module_key] = (d_out, d_in)``; the matrices are keyed the same way."""
        self.k_out, self.k_in = factored_dims
        self.p_out: Dict[str, torch.Tensor] = {}
        self.p_in: Dict[str, torch.Tensor] = {}
        for key, (d_out, d_in) in dims.items():
            self.p_out[key] = projection_matrix(d_out, self.k_out, seed=name_seed(seed, key + "/out"),
                                                kind=kind, dtype=dtype).to(device)
            self.p_in[key] = projection_matrix(d_in, self.k_in, seed=name_seed(seed, key + "/in"),
                                               kind=kind, dtype=dtype).to(device)


def factored_layout(names: Sequence[str], roles: Dict[str, str],
                    factored_dims: Tuple[int, int]) -> List[FeatureBlock]:
    """The feature blocks of ``names`` (parameter order), ``roles[name]`` "weight" or "bias"."""
    k_out, k_in = factored_dims
    return parameter_layout(names, [k_out * k_in if roles[n] == "weight" else k_out for n in names])


def factored_tap(tracked, matrices: FactoredMatrices, offsets: Dict[str, int],
                 phi: torch.Tensor):
    """The factored strategy's tap of one layer: ``P_in^T a`` in the forward pass (never the
    layer's input itself), ``P_out^T delta`` and their product in the backward pass."""
    from .hooks import LayerTap
    adapter = tracked.adapter
    p_out, p_in = matrices.p_out[tracked.key], matrices.p_in[tracked.key]
    wants_weight = any(role == "weight" for role, _ in tracked.params)

    def on_input(inputs: torch.Tensor):
        return adapter.project_tokens(inputs, p_in) if wants_weight else None

    def on_grad(a_in, grad: torch.Tensor) -> None:
        d_out = adapter.output_grads(grad).to(p_out.dtype) @ p_out           # [B, T, k_out]
        for role, name in tracked.params:
            start = offsets[name]
            if role == "weight":
                block = torch.bmm(d_out.transpose(1, 2), a_in)               # [B, k_out, k_in]
            else:
                block = d_out.sum(1)                                         # [B, k_out]
            width = block[0].numel()
            phi[:, start:start + width] += block.reshape(block.shape[0], width).to(phi.dtype)
    return LayerTap(tracked.module, adapter, on_input, on_grad)
