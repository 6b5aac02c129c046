r"""Drop-in replacements for the functions of MadryLab's ``fast_jl`` CUDA extension.

.. code-block:: python

    import trak_fast.compat.fast_jl as fast_jl   # instead of: import fast_jl
    out = fast_jl.project_rademacher_8(grads, 2048, seed, num_sms)

Each ``project_{rademacher,normal}_{8,16,32}(input, N, seed, num_feature_tiles)`` returns

.. math::

    \text{out}[b, j] = \sum_{i} \text{input}[b, i]\, R_s[i, j], \qquad s = \text{seed},

a float32 ``[B, N]`` tensor on ``input``'s device, where ``R_s`` has **unscaled** entries:
``+-1`` (rademacher) or ``N(0, 1)`` (normal; trak_fast's ``"gaussian"`` kind). This is
``trak_fast.project(input, N, seed=seed, kind=..., scale=1.0)``.

What is looser than fast_jl:

- any batch size ``B`` and any ``N >= 1`` (fast_jl needs ``N`` to be a multiple of 512);
- CPU and CUDA tensors; fp16, bf16, fp32 (and fp64) input, any strides;
- the suffix ``_8``/``_16``/``_32`` names fast_jl's batch template (how many rows one CUDA
  block processed); here the six functions differ only in kind, and all accept any ``B``.

What differs: the **values**. fast_jl's matrix depends on ``num_feature_tiles`` (trak
passes the GPU's SM count), so it differs between GPU models and cannot be reproduced;
trak_fast's matrix is a pure function of ``(seed, i, j)``, identical on every CPU and GPU.
Features computed with fast_jl and with this module are therefore not interchangeable
(do not mix them within one TRAK run); they have the same distribution.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ops.projection import project
from ..ops.projection import check_int

__all__ = [
    "project_rademacher_8",
    "project_rademacher_16",
    "project_rademacher_32",
    "project_normal_8",
    "project_normal_16",
    "project_normal_32",
]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _project(input: torch.Tensor, N: int, seed: int, num_feature_tiles: Any, kind: str) -> torch.Tensor:
    # num_feature_tiles: fast_jl splits the feature dimension into tiles sized from this count
    # (trak passes the SM count), and which random stream a feature's row comes from follows
    # that split; that is why its matrix depends on the GPU.
    # trak_fast's entries depend only on (seed, i, j), so the tiling is the kernel's own choice
    # and the argument has nothing to control. It is still type-checked to catch misuse.
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if input.dim() != 2:
        raise ValueError(f"input must be a 2-D tensor [B, num_features], got shape {tuple(input.shape)}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    N = check_int("N", N, 1, 2**31)
    seed = check_int("seed", seed)
    check_int("num_feature_tiles", num_feature_tiles, 0, 2**31)
    return project(input, N, seed=seed, kind=kind, scale=1.0).to(torch.float32)


def project_rademacher_8(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """``input [B, F] @ R [F, N]`` with unscaled ``+-1`` entries of seed ``seed``: float32 ``[B, N]``.

    ``num_feature_tiles`` is accepted and ignored: fast_jl's matrix depended on it (the SM
    count), trak_fast's does not. Any ``B`` (the ``_8`` is fast_jl's batch template). See the
    module docstring.
    """
    return _project(input, N, seed, num_feature_tiles, "rademacher")


def project_rademacher_16(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """Same as :func:`project_rademacher_8` (fast_jl's 16-row template; any ``B`` here)."""
    return _project(input, N, seed, num_feature_tiles, "rademacher")


def project_rademacher_32(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """Same as :func:`project_rademacher_8` (fast_jl's 32-row template; any ``B`` here)."""
    return _project(input, N, seed, num_feature_tiles, "rademacher")


def project_normal_8(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """``input [B, F] @ R [F, N]`` with unscaled ``N(0, 1)`` entries of seed ``seed``: float32 ``[B, N]``.

    ``num_feature_tiles`` is accepted and ignored: fast_jl's matrix depended on it (the SM
    count), trak_fast's does not. Any ``B`` (the ``_8`` is fast_jl's batch template). See the
    module docstring.
    """
    return _project(input, N, seed, num_feature_tiles, "gaussian")


def project_normal_16(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """Same as :func:`project_normal_8` (fast_jl's 16-row template; any ``B`` here)."""
    return _project(input, N, seed, num_feature_tiles, "gaussian")


def project_normal_32(input: torch.Tensor, N: int, seed: int, num_feature_tiles: int) -> torch.Tensor:
    """Same as :func:`project_normal_8` (fast_jl's 32-row template; any ``B`` here)."""
    return _project(input, N, seed, num_feature_tiles, "gaussian")
