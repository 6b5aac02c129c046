r"""``TrakFastProjector``: a projector for MadryLab's ``trak`` (``TRAKer(projector=...)``).

It replaces trak's ``CudaProjector`` (which needs the ``fast_jl`` CUDA extension) and
``BasicProjector`` (which materializes the matrix block by block):

.. code-block:: python

    from trak import TRAKer
    from trak_fast.compat.trak import TrakFastProjector

    projector = TrakFastProjector(grad_dim=num_params, proj_dim=2048, seed=0,
                                  proj_type="rademacher", device="cuda")
    traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                    projector=projector, device="cuda")

What trak relies on, and how it is met:

- ``project(grads, model_id)`` returns ``[B, proj_dim]`` features
  ``out[b, j] = sum_i g[b, i] R_s[i, j]`` with **unscaled** entries (``+-1`` or ``N(0, 1)``),
  trak's convention: ``TRAKer`` divides the features by ``sqrt(grad_dim)`` itself, and
  ``lambda_reg`` is calibrated to that magnitude. ``R_s`` is trak_fast's matrix for seed
  ``s = trak_fast.model_seed(seed, model_id)``, a different matrix for every checkpoint.
- ``grads`` is either the dict ``{param_name: [B, ...]}`` of trak's
  ``FunctionalGradientComputer`` (projected piece by piece, in dict order, never
  concatenated into a ``[B, grad_dim]`` copy) or the ``[B, grad_dim]`` tensor of its
  ``IterativeGradientComputer``.
- ``proj_type`` is stored as a plain string (``"rademacher"`` or ``"normal"``) because
  ``TRAKer`` writes it into ``metadata.json`` and compares it when a run is resumed.
- ``free_memory()`` exists (there is nothing to free: the matrix is never stored).
- Subclass of ``trak.projectors.AbstractProjector`` when trak is importable, so
  ``isinstance`` checks pass; without trak the class works on its own.

The features differ from those of trak's projectors (each draws its own random matrix), but
they have the same distribution, so TRAK scores agree statistically (see the tests).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from ..ops.projection import check_int
from ..ops.projector import Projector, dict_pieces

try:  # Subclass trak's base when it exists so that isinstance(p, AbstractProjector) holds.
    from trak.projectors import AbstractProjector as _Base
except ImportError:  # trak is optional: the projector needs nothing from it.
    _Base = object

__all__ = ["TrakFastProjector", "PROJ_TYPES"]

#: trak's projection types and the trak_fast kind each one maps to.
PROJ_TYPES = {"rademacher": "rademacher", "normal": "gaussian"}

_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _proj_type_name(proj_type: Any) -> str:
    """trak's ``ProjectionType`` member or string -> ``"rademacher"`` / ``"normal"``."""
    # ProjectionType is a ``str`` Enum: its ``.value`` is the name trak compares against.
    name = getattr(proj_type, "value", proj_type)
    if not isinstance(name, str) or name not in PROJ_TYPES:
        raise ValueError(
            f"proj_type must be one of {sorted(PROJ_TYPES)} (trak's ProjectionType names; "
            f"'normal' is trak_fast's 'gaussian'), got {proj_type!r}"
        )
    return name


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    # torch.device("cuda") names the current device; treat it as matching any cuda index.
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


class TrakFastProjector(_Base):
    r"""trak-compatible random projection on trak_fast's on-the-fly kernel (CPU and CUDA).

    Args:
        grad_dim: ``p``, the number of gradient entries per example (trak's
            ``num_params_for_grad``); checked against every batch.
        proj_dim: ``k``, the projected dimension. Any positive int (no multiple-of-512 rule).
        seed: base seed, an int in ``[0, 2**63)``. Checkpoint ``model_id`` uses the matrix of
            seed ``trak_fast.model_seed(seed, model_id)``.
        proj_type: ``"rademacher"`` (entries ``+-1``) or ``"normal"`` (entries ``N(0, 1)``),
            or the matching ``trak.projectors.ProjectionType`` member.
        device: where the features are computed; gradients on another device are moved there
            piece by piece (as trak's projectors do).
        max_batch_size: accepted for signature compatibility with ``CudaProjector`` and
            ignored: trak_fast has no batch-size templates, any batch size works.
        dtype: dtype of the returned features; ``None`` (default) returns float32 (float64 for
            float64 gradients). float32 is safer than trak's fp16: unscaled sums over
            millions of parameters can exceed fp16's range before TRAKer rescales them.
        precision: the CUDA kernel's arithmetic, ``"fp32"`` (default), ``"tf32"`` or
            ``"bf16"`` (see ``trak_fast.project``); the CPU always computes in fp32.

    Attributes:
        grad_dim, proj_dim, seed, proj_type (``str``), device (``torch.device``), dtype,
        projector (the underlying :class:`trak_fast.Projector`, ``scale=1.0``).
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        proj_type: Union[str, Any] = "rademacher",
        device: Union[str, torch.device] = "cpu",
        max_batch_size: Optional[int] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        precision: str = "fp32",
    ) -> None:
        # Not calling AbstractProjector.__init__: it only stores these same attributes, and
        # this class must also work where trak (and so that base) is absent.
        self.grad_dim = check_int("grad_dim", grad_dim, 1, 2**62)
        self.proj_dim = check_int("proj_dim", proj_dim, 1, 2**31)
        self.seed = check_int("seed", seed)
        self.proj_type = _proj_type_name(proj_type)
        self.device = torch.device(device)
        if max_batch_size is not None:
            check_int("max_batch_size", max_batch_size, 1, 2**31)
        self.max_batch_size = max_batch_size
        if dtype is not None and dtype not in _GRAD_DTYPES:
            raise TypeError(f"dtype must be None or a floating dtype, got {dtype}")
        self.dtype = dtype
        self.projector = Projector(
            self.proj_dim, seed=self.seed, kind=PROJ_TYPES[self.proj_type],
            precision=precision, scale=1.0,
        )

    def __repr__(self) -> str:
        return (
            f"TrakFastProjector(grad_dim={self.grad_dim}, proj_dim={self.proj_dim}, "
            f"seed={self.seed}, proj_type={self.proj_type!r}, device={str(self.device)!r}, "
            f"precision={self.projector.precision!r})"
        )

    def _pieces(self, grads: Any) -> list:
        """Checks ``grads`` (dict or ``[B, p]`` tensor) and returns its pieces on ``self.device``."""
        if isinstance(grads, Mapping):
            pieces = dict_pieces(grads)
            names = [f"grads[{k!r}]" for k in grads]
        elif isinstance(grads, torch.Tensor):
            if grads.dim() != 2:
                raise ValueError(
                    f"grads must be a [B, grad_dim] tensor or a dict of per-parameter [B, ...] "
                    f"gradients, got a tensor of shape {tuple(grads.shape)}"
                )
            pieces, names = [grads], ["grads"]
        else:
            raise TypeError(
                "grads must be a dict {param_name: [B, ...] tensor} or a [B, grad_dim] tensor, "
                f"got {type(grads).__name__}"
            )
        for name, g in zip(names, pieces):
            if g.dtype not in _GRAD_DTYPES:
                raise TypeError(f"{name} must be a floating tensor, got {g.dtype}")
        width = sum(g.shape[1:].numel() for g in pieces)  # a [B] piece counts as one entry
        if width != self.grad_dim:
            raise ValueError(
                f"grads hold {width} entries per example, expected grad_dim={self.grad_dim} "
                "(the grad_dim this projector was built with)"
            )
        return [g if _same_device(g.device, self.device) else g.to(self.device) for g in pieces]

    def project(self, grads: Union[Mapping[str, torch.Tensor], torch.Tensor], model_id: int) -> torch.Tensor:
        r"""Projects a batch of gradients with checkpoint ``model_id``'s matrix.

        ``out[b, j] = sum_i g[b, i] * R_s[i, j]``, ``s = model_seed(seed, model_id)``, where
        ``g[b]`` is example ``b``'s gradient: the ``[B, grad_dim]`` tensor's row, or the dict's
        pieces flattened and taken in order (trak's ``vectorize`` order).

        Args:
            grads: ``{param_name: [B, ...]}`` or ``[B, grad_dim]``; fp16, bf16, fp32 or fp64.
            model_id: the checkpoint's id, a non-negative int.

        Returns:
            ``[B, proj_dim]`` features on ``self.device`` (float32 unless ``dtype`` was set).
        """
        model_id = check_int("model_id", model_id)
        out = self.projector(self._pieces(grads), model_id=model_id)
        return out if self.dtype is None else out.to(self.dtype)

    def free_memory(self) -> None:
        """Nothing to free: the matrix is generated inside the kernel and never stored."""
