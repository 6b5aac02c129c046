"""Adapters for the layer types whose per-example gradients come from hooks.

For a layer applied to inputs ``a`` with output gradients ``delta`` (both with any leading
dimensions, flattened here to ``[B, T, d]``), the weight gradient of example ``b`` is

    G_b = sum_t delta[b, t] a[b, t]^T        # [d_out, d_in]
    g_bias_b = sum_t delta[b, t]             # [d_out]

Each adapter knows only how its layer type lays out ``a``, ``delta`` and the weight:

- ``torch.nn.Linear``: ``y = a W^T + b``, ``W [d_out, d_in]``: the parameter is ``G`` itself.
- transformers' ``Conv1D`` (GPT-2): ``y = a W + b``, ``W [d_in, d_out]``: the parameter is ``G^T``.
- ``torch.nn.Conv2d``: the inputs are the ``unfold``-ed patches (``d_in = C_in kh kw``, one
  "token" per output position), ``W [C_out, C_in, kh, kw]`` is ``G`` reshaped.
- ``torch.nn.Embedding``: a lookup table ``W [V, d]``; the input is token ids, and ``a_t`` is
  the one-hot vector of ``id_t`` (:class:`EmbeddingAdapter`).
- ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and any module that *computes*
  ``y = w * h(x) + b`` with a vector weight (Llama's, Qwen2's, Mistral's RMSNorm and their
  kin, found by probing the module, :func:`elementwise_affine_kind`): per-feature gradients
  (:class:`NormAdapter`).

Only modules whose forward is exactly the library's (``type(m) is nn.Linear``, not a subclass
that may compute something else), or whose computation was verified, are adapted; everything
else keeps the vmap path.

What a strategy calls (every adapter has all of these; the math is in each docstring):

- dense, raw or projected: :meth:`LayerAdapter.weight_grad` and :meth:`LayerAdapter.bias_grad`
  for a slice of the batch, or :meth:`LayerAdapter.project_weight` (the cheapest exact dense
  projection: an embedding projects only its batch's distinct rows);
- factored: :attr:`LayerAdapter.factored_dims` (the sizes of ``P_out`` and ``P_in``; ``d_in``
  is ``None`` for vector weights), :meth:`LayerAdapter.factored_width` (a block's columns),
  :meth:`LayerAdapter.factored_input` (forward: what to keep of the input) and
  :meth:`LayerAdapter.factored_features` (backward: the blocks).

Orientation of the factored form. A weight's block is ``vec(P_out^T G P_in)`` with ``G`` the
weight's gradient as the matrix ``[d_out, d_in]`` above (Linear: ``W``'s shape; Conv1D:
``W^T``; Conv2d: ``W`` reshaped; Embedding: the table ``[V, d]`` itself, so ``d_out = V``).
An embedding table tied to an output ``nn.Linear`` (GPT-2's ``wte`` / ``lm_head``) then has the
same ``factored_dims`` ``(V, d)`` for both uses: both blocks are in the same coordinates, and
the parameter's feature is their sum (as its gradient is the sum of both uses').
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .adapter import LayerAdapter, Project  # noqa: F401  (the interface, re-exported)
from .norms import (LayerNormAdapter, NormAdapter, RMSNormAdapter,  # noqa: F401
                    _own_forward, elementwise_affine_kind)


class LinearAdapter(LayerAdapter):
    rows_of = "out"

    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features


class Conv1DAdapter(LayerAdapter):
    """transformers' ``Conv1D``: a linear layer with the weight stored as ``[d_in, d_out]``."""

    rows_of = "in"

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1]

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return super().weight_grad(inputs, grad).transpose(1, 2)          # [B, d_in, d_out]

    def weight_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        return weight_like.T


class Conv2dAdapter(LayerAdapter):
    """``torch.nn.Conv2d`` (groups = 1, zero padding): patches from ``F.unfold``."""

    @property
    def d_in(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    @property
    def d_out(self) -> int:
        return self.module.out_channels

    def _conv_args(self):
        m = self.module
        padding = (0, 0) if m.padding == "valid" else m.padding
        return dict(stride=m.stride, padding=padding, dilation=m.dilation)

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 3:                          # unbatched [C, H, W] is not per-example
            raise ValueError("Conv2d inputs must be batched [B, C, H, W] for per-example gradients")
        patches = F.unfold(inputs, self.module.kernel_size, **self._conv_args())  # [B, d_in, L]
        return patches.transpose(1, 2)

    def output_grads(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)   # [B, L, C_out]

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return super().weight_grad(inputs, grad).reshape(grad.shape[0], *self.module.weight.shape)

    def project_tokens(self, inputs: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        # A convolution with P_in's columns as filters: the same numbers as unfold(x) @ P_in,
        # without the k_h k_w-times larger patch tensor.
        m = self.module
        filters = p_in.t().reshape(p_in.shape[1], m.in_channels, *m.kernel_size)
        out = F.conv2d(inputs.to(p_in.dtype), filters.contiguous(), None, **self._conv_args())
        return out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)


class EmbeddingAdapter(LayerAdapter):
    """``torch.nn.Embedding``: the input is token ids, the weight ``W [V, d]`` a lookup table.

    With ``a_t = e_{id_t}`` (one-hot, ``V``) and output gradients ``delta_t`` (``d``), example
    ``b``'s weight gradient is a sum of one-hot outer products

        G_b = sum_t e_{id_bt} delta_bt^T,    i.e.  G_b[v] = sum_{t: id_bt = v} delta_bt,

    shape ``[V, d]`` like the table (the row ``padding_idx`` gets none, as in the module's own
    backward). Only the rows of the example's ids are nonzero: :meth:`project_weight` projects
    just those, ``O(U d k)`` for ``U`` distinct ids of the batch instead of ``O(V d k)``.

    Factored (``factored_dims = (V, d)``, the table's orientation):
    ``P_out^T G_b P_in = sum_t P_out[id_bt]^T (P_in^T delta_bt)^T``: a gather of ``P_out``'s
    rows and a ``[T, d] x [d, k_in]`` product per example; the table is never formed.

    Note ``d_in = V`` and ``d_out = d`` (the roles of ``a`` and ``delta`` in ``y = W^T a``);
    :attr:`factored_dims` is ``(V, d)``, the table's own shape, so that an output ``nn.Linear``
    tied to the table (weight ``[V, d]`` = its ``(d_out, d_in)``) agrees with it.

    A table looked up with an index shared by the batch (GPT-2's ``wpe`` and BERT's position
    table see ``[1, T]`` positions broadcast over the batch) reaches the adapter with that
    index expanded to ``[B, T]`` by the hooks (:func:`~trak_fast.gradients.hooks.tapped`),
    with the per-example output gradients: nothing here differs.
    """

    factored = False                  # legacy flag (see LayerAdapter.factored)

    @property
    def d_in(self) -> int:
        return self.module.num_embeddings

    @property
    def d_out(self) -> int:
        return self.module.embedding_dim

    @property
    def factored_dims(self) -> Tuple[int, Optional[int]]:
        return self.module.num_embeddings, self.module.embedding_dim

    def _ids_and_delta(self, inputs: torch.Tensor, grad: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = inputs.reshape(inputs.shape[0], -1)
        delta = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        if self.module.padding_idx is not None:
            delta = delta.masked_fill((ids == self.module.padding_idx)[..., None], 0)
        return ids, delta

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ids, delta = self._ids_and_delta(inputs, grad)
        out = delta.new_zeros(ids.shape[0], self.d_in, self.d_out)
        return out.scatter_add_(1, ids[..., None].expand(-1, -1, self.d_out), delta)

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        raise TypeError("nn.Embedding has no bias")

    def project_weight(self, inputs: torch.Tensor, grad: torch.Tensor, project: Project,
                       max_elements: Optional[int] = None) -> None:
        """``P^T vec(G_b) = sum_v P_v^T G_b[v]`` over the batch's distinct ids ``v`` (``P_v``
        the ``d`` rows of ``P`` of table row ``v``, elements ``v d .. v d + d - 1``): one
        ``project`` call per run of consecutive distinct ids, with ``values [B, run d]``."""
        ids, delta = self._ids_and_delta(inputs, grad)
        batch, d = ids.shape[0], self.d_out
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = delta.new_zeros(batch, len(unique), d).scatter_add_(
            1, inverse[..., None].expand(-1, -1, d), delta)                 # [B, U, d]
        values = unique.tolist()
        start = 0
        for stop in range(1, len(values) + 1):
            if stop == len(values) or values[stop] != values[stop - 1] + 1:
                project(rows[:, start:stop].reshape(batch, -1), values[start] * d)
                start = stop

    def factored_input(self, inputs: torch.Tensor, p_in: Optional[torch.Tensor]) -> object:
        """The ids ``[B, T]`` (the rows of ``P_out`` are gathered in the backward pass)."""
        return inputs.reshape(inputs.shape[0], -1)

    def factored_features(self, state: object, grad: torch.Tensor, p_out: torch.Tensor,
                          p_in: Optional[torch.Tensor], roles: Sequence[str]
                          ) -> List[torch.Tensor]:
        if list(roles) != ["weight"]:
            raise TypeError(f"nn.Embedding has only a weight, got roles {list(roles)}")
        ids, delta = self._ids_and_delta(state, grad)
        rows = p_out[ids]                                                  # [B, T, k_out]
        block = torch.bmm(rows.transpose(1, 2), delta.to(p_in.dtype) @ p_in)   # [B, k_out, k_in]
        return [block.reshape(block.shape[0], -1)]


# ---- recognising modules ---------------------------------------------------------------------

def _is_transformers_conv1d(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def adapter_for(module: torch.nn.Module) -> Optional[LayerAdapter]:
    """The adapter of a supported module, or ``None`` (its parameters take the vmap path)."""
    cls = type(module)
    if cls is torch.nn.Linear:
        return LinearAdapter(module)
    if cls is torch.nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same":
            return None
        return Conv2dAdapter(module)
    if _is_transformers_conv1d(module):
        return Conv1DAdapter(module)
    if cls is torch.nn.Embedding:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return None              # renormalizes the table in forward / rescales gradients
        return EmbeddingAdapter(module)
    if cls is torch.nn.LayerNorm:
        if module.weight is None:
            return None
        return LayerNormAdapter(module)
    if cls is getattr(torch.nn, "RMSNorm", None):
        if module.weight is None:
            return None
        return RMSNormAdapter(module)
    if elementwise_affine_kind(module) is not None:
        return NormAdapter(module, _own_forward(module))
    return None
