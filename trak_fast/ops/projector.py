r"""``Projector``: the projection as an object, for codebases that pass a projector around.

A ``Projector`` is a frozen bundle of the settings of :func:`trak_fast.project`
(``proj_dim``, ``seed``, ``kind``, ``precision``, ``scale``, ``nnz``) that is called on gradients:

.. code-block:: python

    proj = Projector(2048, seed=0)
    feats = proj(grads)                # grads: [B, n] tensor, list/tuple or dict of [B, ...]
    feats = proj(grads, model_id=3)    # checkpoint 3 of an ensemble: its own matrix

The math is that of :func:`trak_fast.project`: for the matrix seed ``s``,

.. math::

    \text{out}[b, j] = c \sum_i g[b, i]\, R_s[\text{feature\_offset} + i, j],
    \qquad c = \text{scale} \text{ (default } 1/\sqrt{k}),

with ``R_s`` entries ``+-1`` (``kind="rademacher"``) or ``N(0, 1)`` (``kind="gaussian"``), or
``nnz`` entries ``+-1`` per row (``kind="sparse"``, where the default ``c`` is ``1/sqrt(nnz)``).
The seed ``s`` of a call is

- ``seed`` when neither ``model_id`` nor ``seed_offset`` is given;
- ``trak_fast.model_seed(seed, model_id)`` for ``model_id=...``: the ensemble convention
  that trak_fast's own stores use, so features made here match theirs;
- ``seed + seed_offset`` for ``seed_offset=...``: for callers that already derive their
  own per-model seeds (e.g. trak's ``seed + 10_000 * model_id``) and want that exact seed.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch

from .projection import (MAX_SEED, Grads, _check_precision, _check_scale, check_int, check_kind, check_nnz,
                         model_seed, project, projection_matrix)


__all__ = ["Projector"]


def dict_pieces(grads: Mapping[str, torch.Tensor]) -> list:
    """The values of a ``{name: [B, ...]}`` gradient dict, in order, checked with key names.

    ``trak_fast.project`` checks a dict the same way, but also requires one device; this is
    for callers that move the pieces to a device of their own first (the trak compat layer).
    """
    if len(grads) == 0:
        raise ValueError("grads must hold at least one tensor, got an empty dict")
    pieces = []
    first_key, batch = None, None
    for key, g in grads.items():
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{key!r}] must be a tensor, got {type(g).__name__}")
        if g.dim() < 1:
            raise ValueError(f"grads[{key!r}] must have a batch dimension [B, ...], got a 0-d tensor")
        if batch is None:
            first_key, batch = key, g.shape[0]
        elif g.shape[0] != batch:
            raise ValueError(
                f"grads[{key!r}] has batch size {g.shape[0]}, expected {batch} "
                f"(the batch size of grads[{first_key!r}]): every per-parameter gradient "
                "must hold the same examples"
            )
        pieces.append(g)
    return pieces


class Projector:
    r"""A reusable random projection ``[B, n] -> [B, proj_dim]`` (see the module docstring).

    Args:
        proj_dim: ``k``, the number of output features.
        seed: the base seed, any int in ``[0, 2**63)``.
        kind: ``"rademacher"``, ``"gaussian"`` or ``"sparse"``.
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"``: the CUDA kernel's arithmetic
            (the CPU always computes in fp32, fp64 for fp64 input).
        scale: the factor ``c`` in front of the sum; ``None`` gives ``1/sqrt(k)``, so that
            ``E ||proj(g)||^2 = ||g||^2`` (``1/sqrt(nnz)`` for sparse); ``1.0`` gives the
            unscaled matrix (trak's convention).
        nnz: nonzeros per row for ``kind="sparse"`` (an int in ``[1, min(64, k)]``).

    Instances are immutable, hashable and compare equal when their settings are equal;
    calling one is traceable by ``torch.compile(fullgraph=True)``.
    """

    __slots__ = ("_proj_dim", "_seed", "_kind", "_precision", "_scale", "_nnz")

    def __init__(
        self,
        proj_dim: int,
        *,
        seed: int = 0,
        kind: str = "rademacher",
        precision: str = "fp32",
        scale: Optional[float] = None,
        nnz: int = 4,
    ) -> None:
        proj_dim = check_int("proj_dim", proj_dim, 1, 2**31)
        seed = check_int("seed", seed)
        nnz = check_nnz(nnz, check_kind(kind), proj_dim)
        _check_precision(precision)
        if scale is not None:
            scale = _check_scale(scale, proj_dim)
        object.__setattr__(self, "_proj_dim", proj_dim)
        object.__setattr__(self, "_seed", seed)
        object.__setattr__(self, "_kind", str(kind))
        object.__setattr__(self, "_precision", str(precision))
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_nnz", nnz)

    # Read-only settings: a projector that changes under a running pipeline would silently
    # mix matrices, so there are no setters (use ``replace``).
    @property
    def proj_dim(self) -> int:
        return self._proj_dim

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def scale(self) -> Optional[float]:
        return self._scale

    @property
    def nnz(self) -> int:
        return self._nnz

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Projector is immutable; use projector.replace({name}=...) instead")

    def replace(self, **changes: Any) -> "Projector":
        """A copy with some settings changed, e.g. ``proj.replace(proj_dim=4096)``."""
        settings = self.to_dict()
        unknown = set(changes) - set(settings)
        if unknown:
            raise TypeError(f"replace() got unknown settings {sorted(unknown)}; known: {sorted(settings)}")
        settings.update(changes)
        return Projector(**settings)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a JSON-serializable dict; ``Projector(**d)`` rebuilds the projector."""
        return {
            "proj_dim": self._proj_dim,
            "seed": self._seed,
            "kind": self._kind,
            "precision": self._precision,
            "scale": self._scale,
            "nnz": self._nnz,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Projector({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Projector):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __reduce__(self):
        # The default slot-state pickling would go through the blocked __setattr__.
        return (_from_settings, (self.to_dict(),))

    def seed_for(self, model_id: Optional[int] = None, seed_offset: Optional[int] = None) -> int:
        """The matrix seed used for a call with these ``model_id`` / ``seed_offset`` arguments.

        ``seed``; ``model_seed(seed, model_id)``; or ``seed + seed_offset`` (at most one of
        the two may be given). Two calls use the same matrix exactly when this is equal.
        """
        if model_id is not None and seed_offset is not None:
            raise ValueError(
                "pass model_id or seed_offset, not both: model_id derives the seed with "
                "trak_fast.model_seed(seed, model_id), seed_offset adds to seed directly"
            )
        if model_id is not None:
            return model_seed(self._seed, check_int("model_id", model_id))
        if seed_offset is not None:
            offset = check_int("seed_offset", seed_offset)
            if self._seed + offset >= MAX_SEED:
                raise ValueError(
                    f"seed + seed_offset must be below 2**63, got {self._seed} + {offset}"
                )
            return self._seed + offset
        return self._seed

    def __call__(
        self,
        grads: Grads,
        *,
        model_id: Optional[int] = None,
        seed_offset: Optional[int] = None,
        feature_offset: int = 0,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""Projects ``grads``: ``[B, n]`` (or pieces of ``[B, ...]``) to ``[B, proj_dim]``.

        Args:
            grads: a ``[B, n]`` tensor; a list or tuple of ``[B, ...]`` tensors; or a dict
                ``{name: [B, ...]}`` (as ``torch.func`` returns), projected in insertion
                order. Pieces are treated as one feature row per example, never concatenated.
            model_id: checkpoint id in an ensemble; the matrix seed is
                ``model_seed(seed, model_id)``.
            seed_offset: alternatively, the matrix seed is ``seed + seed_offset``.
            feature_offset: index of the first matrix row used (projecting a model in slices:
                ``proj(a) + proj(b, feature_offset=a_width) == proj([a, b])``).
            out: optional ``[B, proj_dim]`` tensor to **add** the result into (and return).

        Returns:
            ``out[b, j] = c * sum_i grads[b, i] * R_s[feature_offset + i, j]``: ``[B, proj_dim]``
            float32 (float64 when any input is float64), on the device of ``grads``.
        """
        return project(
            grads,
            self._proj_dim,
            seed=self.seed_for(model_id, seed_offset),
            kind=self._kind,
            feature_offset=feature_offset,
            out=out,
            precision=self._precision,
            scale=self._scale,
            nnz=self._nnz,
        )

    def matrix(
        self,
        n: int,
        *,
        model_id: Optional[int] = None,
        seed_offset: Optional[int] = None,
        feature_offset: int = 0,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The ``[n, proj_dim]`` matrix ``c * R_s`` that ``__call__`` applies, materialized.

        ``proj(g, model_id=m) == g @ proj.matrix(g.shape[1], model_id=m)`` up to rounding.
        For tests and debugging: it costs ``n * proj_dim`` memory that ``__call__`` avoids.
        """
        return projection_matrix(
            n,
            self._proj_dim,
            seed=self.seed_for(model_id, seed_offset),
            kind=self._kind,
            feature_offset=feature_offset,
            device=device,
            dtype=dtype,
            scale=self._scale,
            nnz=self._nnz,
        )


def _from_settings(settings: Dict[str, Any]) -> Projector:
    return Projector(**settings)
