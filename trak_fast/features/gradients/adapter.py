"""The interface every layer adapter implements (see :mod:`.layers` for the math and the types)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

#: ``project(values [B, n], offset)`` projects ``values`` as the ``n`` consecutive elements of
#: the flattened per-example weight gradient that start at element ``offset`` (0 for a whole
#: gradient) and adds the result into the batch's features. The other elements are zero.
Project = Callable[[torch.Tensor, int], None]


class LayerAdapter:
    """How one supported module type maps ``(a, delta)`` to gradients and projections."""

    #: Legacy flag read by today's ``plan_gradients``: whether its ``_factored_tap`` (which
    #: uses :meth:`project_tokens` and :meth:`output_grads` only) handles this layer. Every
    #: adapter has a factored form through :meth:`factored_features`.
    factored = True

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    @property
    def factored_dims(self) -> Tuple[int, Optional[int]]:
        """``(d_out, d_in)``: the rows of ``P_out`` and ``P_in`` of the factored form
        (``d_in`` ``None``: a vector weight, no ``P_in``). Uses of one tied parameter must agree."""
        return self.d_out, self.d_in

    def weight_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        """A tensor of the weight's shape as the ``[d_out, d_in]`` matrix of the factored form
        (Linear, Conv2d, Embedding: rows are dimension 0; Conv1D transposes)."""
        return weight_like.reshape(weight_like.shape[0], -1)

    # ---- exact per-example gradients -----------------------------------------------------------

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """``a [B, T, d_in]``: the layer's input, one row per token (or output position)."""
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def output_grads(self, grad: torch.Tensor) -> torch.Tensor:
        """``delta [B, T, d_out]`` from the gradient of the module's output."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def weight_grad(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients ``[B, *weight.shape]`` for a slice of the batch.

        ``inputs`` is the module's input and ``grad`` its output gradient, both for the same
        rows of the batch."""
        a, delta = self.tokens(inputs), self.output_grads(grad)
        return torch.bmm(delta.transpose(1, 2), a.to(delta.dtype))           # [B, d_out, d_in]

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-example bias gradients ``[B, *bias.shape]``: ``sum_t delta_t``."""
        return self.output_grads(grad).sum(1)

    #: How a matrix weight's flat elements are ordered, for :meth:`project_weight`'s slices:
    #: ``"out"`` (the weight is ``G [d_out, d_in]`` row-major: Linear), ``"in"`` (it is ``G^T``:
    #: Conv1D), ``None`` (not sliced: the strategy slices the batch instead).
    rows_of: Optional[str] = None

    def project_weight(self, inputs: torch.Tensor, grad: torch.Tensor, project: Project,
                       max_elements: Optional[int] = None) -> None:
        """The dense projection ``P^T vec(G_b)`` of each example's weight gradient, by calls to
        ``project(values, offset)`` (see :data:`Project`).

        One call with the whole per-example gradient, ``[B, numel]`` at offset 0, when it fits
        ``max_elements``. Otherwise a matrix weight (:attr:`rows_of`) is formed and projected
        in slices of its rows for the whole batch, ``G_b[r0:r1] = delta_b[:, r0:r1]^T a_b``
        (elements ``r0 d_in ...``, consecutive in the flat weight): every row of ``P`` is then
        generated once per batch, never once per slice of the batch. Adapters whose gradient is
        sparse project less (:class:`~.layers.EmbeddingAdapter`)."""
        numel = self.module.weight.numel()
        if self.rows_of is None or max_elements is None or grad.shape[0] * numel <= max_elements:
            g = self.weight_grad(inputs, grad)
            project(g.reshape(g.shape[0], -1), 0)
            return
        a, delta = self.tokens(inputs), self.output_grads(grad)
        a = a.to(delta.dtype)
        left, right = (delta, a) if self.rows_of == "out" else (a, delta)
        batch, rows, width = left.shape[0], left.shape[-1], right.shape[-1]
        step = max(1, min(rows, max_elements // max(1, batch * width)))
        for r0 in range(0, rows, step):
            g = torch.bmm(left[..., r0:r0 + step].transpose(1, 2), right)     # [B, step, width]
            project(g.reshape(batch, -1), r0 * width)
            del g

    # ---- factored projection ---------------------------------------------------------------------

    def project_tokens(self, inputs: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """``a P_in``: ``[B, T, k_in]`` without forming anything larger."""
        return self.tokens(inputs).to(p_in.dtype) @ p_in

    def factored_width(self, role: str, k_out: int, k_in: int) -> int:
        """Columns of a ``role`` ("weight" / "bias") block: ``k_out k_in`` for a matrix weight,
        ``k_out`` for a bias (and for a vector weight, see :class:`NormAdapter`)."""
        return k_out * k_in if role == "weight" else k_out

    def factored_input(self, inputs: torch.Tensor, p_in: Optional[torch.Tensor]) -> object:
        """Forward pass: what the backward pass needs of the input (here ``a P_in`` ``[B, T,
        k_in]``, or ``None`` when ``p_in`` is ``None``: no weight is tracked)."""
        return None if p_in is None else self.project_tokens(inputs, p_in)

    def factored_features(self, state: object, grad: torch.Tensor, p_out: torch.Tensor,
                          p_in: Optional[torch.Tensor], roles: Sequence[str]
                          ) -> List[torch.Tensor]:
        """Backward pass: one block ``[B, width]`` per role of ``roles``.

        weight: ``vec(P_out^T G_b P_in) = vec(sum_t (P_out^T delta_t)(P_in^T a_t)^T)``,
        row-major ``k_out x k_in``; bias: ``P_out^T sum_t delta_t``. ``state`` is what
        :meth:`factored_input` returned for the same call of the module."""
        d_out = self.output_grads(grad).to(p_out.dtype) @ p_out            # [B, T, k_out]
        blocks = []
        for role in roles:
            if role == "weight":
                block = torch.bmm(d_out.transpose(1, 2), state)            # [B, k_out, k_in]
            else:
                block = d_out.sum(1)                                       # [B, k_out]
            blocks.append(block.reshape(block.shape[0], -1))
        return blocks
