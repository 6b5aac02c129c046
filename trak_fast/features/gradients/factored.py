"""The factored projection: per-layer features ``vec(P_out^T G P_in)`` without forming ``G``.

For a supported layer with per-example weight gradient ``G = sum_t delta_t a_t^T``
(``[d_out, d_in]``, see :mod:`trak_fast.gradients.layers`) and two random matrices
``P_out [d_out, k_out]`` and ``P_in [d_in, k_in]`` (entries of variance ``1/k_out`` and
``1/k_in``, from the same definition as every trak_fast matrix)::

    P_out^T G P_in = sum_t (P_out^T delta_t) (P_in^T a_t)^T        # [k_out, k_in]

so the feature costs ``O(T (d_in k_in + d_out k_out + k_out k_in))`` per example instead of
the ``O(d_in d_out k)`` of a dense projection of ``vec(G)``. Embeddings (the table's gradient
``G = sum_t e_{id_t} delta_t^T`` ``[V, d]``: ``P_out^T e_{id_t}`` is a row of ``P_out``, gathered) and norms (vector weights: ``P_out^T g``, ``k_out``
features) have their own forms, see :mod:`trak_fast.gradients.layers`; the adapters'
``factored_input`` / ``factored_features`` compute every block. It is norm preserving on
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...ops.projection import model_seed, projection_matrix
from ..layout import FeatureBlock, parameter_layout


def name_seed(seed: int, name: str) -> int:
    """``model_seed(seed, h(name))``: the seed of a matrix that belongs to ``name``."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return model_seed(seed, int.from_bytes(digest, "little") & ((1 << 63) - 1))


class FactoredMatrices:
    """``P_out`` and ``P_in`` of every tracked weight (``P_out`` of a bias is its weight's).

    ``p_in[key]`` is ``None`` for a vector weight (a norm's, ``d_in = None``): its block is
    ``P_out^T g``."""

    def __init__(self, seed: int, kind: str, factored_dims: Tuple[int, int],
                 dims: Dict[str, Tuple[int, Optional[int]]], device: torch.device,
                 dtype: torch.dtype):
        """``dims[module_key] = (d_out, d_in)`` (an adapter's ``factored_dims``); the matrices
        are keyed the same way."""
        self.k_out, self.k_in = factored_dims
        self.p_out: Dict[str, torch.Tensor] = {}
        self.p_in: Dict[str, Optional[torch.Tensor]] = {}
        for key, (d_out, d_in) in dims.items():
            self.p_out[key] = projection_matrix(d_out, self.k_out, seed=name_seed(seed, key + "/out"),
                                                kind=kind, dtype=dtype).to(device)
            self.p_in[key] = None if d_in is None else projection_matrix(
                d_in, self.k_in, seed=name_seed(seed, key + "/in"), kind=kind, dtype=dtype).to(device)
        #: Unscaled ``P_out`` of the keys whose rows :meth:`scale_rows` scaled (their biases'),
        #: and the second moments it used.
        self.plain_out: Dict[str, torch.Tensor] = {}
        self.moments = None

    def scale_rows(self, moments, modules) -> None:
        """``P_out <- diag(a) P_out``, ``P_in <- diag(b) P_in`` for every tracked weight, with
        ``a b^T`` the rank-one inverse root of its second moment (:mod:`.second_moment`);
        ``modules`` are the plan's ``TrackedModule`` entries (their adapters orient the
        weight). Biases are divided exactly in :func:`factored_tap`, with ``plain_out``."""
        self.moments = moments
        for tracked in modules:
            key = tracked.key
            if key in self.plain_out:
                continue
            self.plain_out[key] = self.p_out[key]
            if key not in moments.inverse:       # the weight is not featurized: biases only
                continue
            a, b = moments.factors(key, tracked.adapter.weight_matrix)
            self.p_out[key] = self.p_out[key] * a.to(self.p_out[key].dtype)[:, None]
            if b is not None:
                self.p_in[key] = self.p_in[key] * b.to(self.p_in[key].dtype)[:, None]


def factored_layout(names: Sequence[str], roles: Dict[str, str],
                    factored_dims: Tuple[int, int],
                    widths: Optional[Dict[str, int]] = None) -> List[FeatureBlock]:
    """The feature blocks of ``names`` (parameter order), ``roles[name]`` "weight" or "bias".

    A block has ``widths[name]`` columns when given (see :func:`factored_widths`), else
    ``k_out k_in`` for a weight and ``k_out`` for a bias."""
    k_out, k_in = factored_dims
    widths = widths or {}
    return parameter_layout(names, [widths.get(n, k_out * k_in if roles[n] == "weight" else k_out)
                                    for n in names])


def factored_widths(modules, factored_dims: Tuple[int, int]) -> Dict[str, int]:
    """``{name: columns}`` of every tracked parameter of ``modules`` (the plan's
    ``TrackedModule`` list: ``.adapter`` and ``.params = [(role, name)]``), from each adapter's
    :meth:`~trak_fast.gradients.layers.LayerAdapter.factored_width`: ``k_out k_in`` for a
    matrix weight, ``k_out`` for a bias or a vector weight (norms). Raises if the uses of one
    tied parameter disagree."""
    k_out, k_in = factored_dims
    widths: Dict[str, int] = {}
    for tracked in modules:
        for role, name in tracked.params:
            width = tracked.adapter.factored_width(role, k_out, k_in)
            if widths.setdefault(name, width) != width:
                raise ValueError(f"the uses of the tied parameter {name!r} have factored "
                                 f"blocks of {widths[name]} and {width} columns")
    return widths


def factored_tap(tracked, matrices: FactoredMatrices, offsets: Dict[str, int], phi: torch.Tensor):
    """The factored strategy's tap of one layer: the adapter's ``factored_input`` in the forward
    pass (e.g. ``P_in^T a``, never the layer's input itself), its ``factored_features`` (e.g.
    ``vec(P_out^T G P_in)``) in the backward pass, added at each parameter's columns (the uses
    of a tied parameter add up)."""
    from .hooks import LayerTap
    adapter = tracked.adapter
    p_out, p_in = matrices.p_out[tracked.key], matrices.p_in[tracked.key]
    wants_weight = any(role == "weight" for role, _ in tracked.params)
    roles = [role for role, _ in tracked.params]

    def on_input(inputs: torch.Tensor):
        return adapter.factored_input(inputs, p_in if wants_weight else None)

    moments = matrices.moments
    exact_biases = moments is not None and "bias" in roles    # divided exactly (second_moment)
    plain_out = matrices.plain_out.get(tracked.key, p_out)
    factored_roles = [role for role in roles if not (exact_biases and role == "bias")]

    def on_grad(state, grad: torch.Tensor) -> None:
        blocks = iter(adapter.factored_features(state, grad, p_out, p_in, factored_roles)
                      if factored_roles else [])
        for role, name in tracked.params:
            if exact_biases and role == "bias":
                g = moments.scale(adapter.bias_grad(grad), name)
                block = g.reshape(g.shape[0], -1).to(plain_out.dtype) @ plain_out
            else:
                block = next(blocks)
            start = offsets[name]
            phi[:, start:start + block.shape[1]] += block.to(phi.dtype)
    return LayerTap(tracked.module, adapter, on_input, on_grad)
