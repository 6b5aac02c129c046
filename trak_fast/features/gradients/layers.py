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
- ``torch.nn.Embedding`` and ``torch.nn.LayerNorm`` (exact per-example gradients only; they
  have no factored form): see their adapters.

Only modules whose forward is exactly the library's are adapted (``type(m) is nn.Linear``,
not a subclass that may compute something else); everything else keeps the vmap path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class LayerAdapter:
    """How one supported module type maps ``(a, delta)`` to gradients and projections."""

    #: Whether ``projection="factored"`` has a form for this layer (``vec(P_out^T G P_in)``).
    factored = True

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """``a [B, T, d_in]``: the layer's input, one row per token (or output position)."""
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def output_grads(self, grad: torch.Tensor) -> torch.Tensor:
        """``delta [B, T, d_out]`` from the gradient of the module's output."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients ``[B, *weight.shape]`` for a slice of the batch."""
        a, delta = self.tokens(inputs), self.output_grads(grad)
        return torch.bmm(delta.transpose(1, 2), a.to(delta.dtype))           # [B, d_out, d_in]

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-example bias gradients ``[B, d_out]``."""
        return self.output_grads(grad).sum(1)

    def project_tokens(self, inputs: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """``a P_in``: ``[B, T, k_in]`` without forming anything larger."""
        return self.tokens(inputs).to(p_in.dtype) @ p_in

    def project_dense(self, role: str, inputs: torch.Tensor, grad: torch.Tensor, name: str,
                      writer, phi: torch.Tensor) -> bool:
        """Projects parameter ``name``'s per-example gradient into ``phi`` by a cheaper exact
        form than forming it, if this layer type has one; returns whether it did. ``writer`` is
        the strategy's :class:`~.writer.FeatureWriter`."""
        return False


class LinearAdapter(LayerAdapter):
    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features


class Conv1DAdapter(LayerAdapter):
    """transformers' ``Conv1D``: a linear layer with the weight stored as ``[d_in, d_out]``."""

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1]

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return super().weight_grad(inputs, grad).transpose(1, 2)          # [B, d_in, d_out]


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
    """``torch.nn.Embedding``: the input is token ids, the weight ``[V, d]`` a lookup table.

    Example ``b``'s weight gradient is its output gradients added into the rows of its ids,
    ``G_b[v] = sum_{t: id_bt = v} delta_bt`` (the row ``padding_idx`` gets none, as in the
    module's own backward). Dense hook path only: no factored form.
    """

    factored = False

    @property
    def d_in(self) -> int:
        return self.module.num_embeddings

    @property
    def d_out(self) -> int:
        return self.module.embedding_dim

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ids = inputs.reshape(inputs.shape[0], -1)
        delta = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        if self.module.padding_idx is not None:
            delta = delta.masked_fill((ids == self.module.padding_idx)[..., None], 0)
        out = delta.new_zeros(ids.shape[0], self.d_in, self.d_out)
        return out.scatter_add_(1, ids[..., None].expand(-1, -1, self.d_out), delta)

    def project_dense(self, role: str, inputs: torch.Tensor, grad: torch.Tensor, name: str,
                      writer, phi: torch.Tensor) -> bool:
        """Example ``b``'s gradient has a nonzero row only per id it holds:
        ``P^T G_b = sum_v P_v^T G_b[v]`` over the batch's distinct ids ``v`` (``P_v`` the ``d``
        rows of P of table row ``v``), one projection per run of consecutive ids. That costs
        ``O(U d k)`` for ``U`` distinct ids instead of the table's ``O(V d k)``."""
        if role != "weight" or not writer.dense:
            return False
        batch, d = grad.shape[0], self.d_out
        ids = inputs.reshape(batch, -1)
        delta = grad.reshape(batch, -1, d).to(phi.dtype)
        if self.module.padding_idx is not None:
            delta = delta.masked_fill((ids == self.module.padding_idx)[..., None], 0)
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = delta.new_zeros(batch, len(unique), d).scatter_add_(
            1, inverse[..., None].expand(-1, -1, d), delta)                 # [B, U, d]
        values = unique.tolist()
        start = 0
        for stop in range(1, len(values) + 1):
            if stop == len(values) or values[stop] != values[stop - 1] + 1:
                writer.add_rows(rows[:, start:stop].reshape(batch, -1), name, values[start] * d, phi)
                start = stop
        return True


class LayerNormAdapter(LayerAdapter):
    """``torch.nn.LayerNorm`` with an elementwise affine: ``y = xhat * w + b``.

    ``G_b(w) = sum_t delta_bt * xhat_bt`` and ``G_b(b) = sum_t delta_bt`` (shape
    ``normalized_shape``), with ``xhat`` recomputed from the input by ``F.layer_norm`` without
    affine, the module's own arithmetic. Dense hook path only: no factored form.
    """

    factored = False

    @property
    def d_in(self) -> int:
        return self.module.weight.numel()

    @property
    def d_out(self) -> int:
        return self.module.weight.numel()

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1, self.module.weight.numel())

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        m = self.module
        xhat = F.layer_norm(inputs.to(grad.dtype), m.normalized_shape, None, None, m.eps)
        return (self._flat(grad) * self._flat(xhat)).sum(1).reshape(grad.shape[0], *m.weight.shape)

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return self._flat(grad).sum(1).reshape(grad.shape[0], *self.module.bias.shape)


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
        if module.weight is None or module.bias is None:
            return None
        return LayerNormAdapter(module)
    return None
