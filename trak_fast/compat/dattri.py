"""A drop-in projector for dattri (0.3.0): its attributors, projecting with trak_fast.

dattri's attributors (``TRAKAttributor``, ``TracInAttributor``, ``DVEmbAttributor``) build a
projector for every batch through ``dattri.func.projection.random_project(feature,
feature_batch_size, proj_dim, proj_max_batch_size, proj_seed, proj_type, device=...)``,
which returns ``f(feature, ensemble_id=0) -> [B, proj_dim]``; on the CPU its dense path
draws and stores P (``n x proj_dim``) for every call.

:func:`random_project` has the same signature and return convention, backed by
:func:`trak_fast.project` (P generated on the fly, nothing stored):

- ``proj_type``: ``"normal"`` -> ``kind="gaussian"``, ``"rademacher"`` -> ``"rademacher"``,
  ``"sjlt"`` -> ``"sparse"`` with ``nnz=sjlt_nnz`` (default 1, as dattri's SJLT); any other
  type (``"identity"``, ``"random_mask"``, ``"grass"``) is passed to dattri's own function;
- ``proj_dim``; the scaling is dattri's, ``1/sqrt(proj_dim)`` for the dense types (and
  ``1/sqrt(nnz)`` for sparse, so that ``E ||f(g)||^2 = ||g||^2`` for every type);
- the seed of ensemble member ``e`` is ``trak_fast.model_seed(proj_seed, e)`` (trak_fast's
  per-checkpoint seed), so different ``ensemble_id`` give independent matrices;
- ``feature`` a ``[B, n]`` tensor or a dict of per-parameter ``[B, ...]`` tensors (projected
  piece by piece, never concatenated); the result has the feature's dtype, on ``device``;
- ``proj_max_batch_size`` (a CUDA-projector tuning knob) is accepted and ignored.

The matrices are trak_fast's, not dattri's: scores agree with dattri's as two of dattri's
own seeds agree with each other (tests/test_compat_dattri.py), not bit for bit.

:func:`use_trak_fast` installs it into dattri for the duration of a ``with`` block and
restores dattri's own function on exit, exceptions included::

    with trak_fast.compat.dattri.use_trak_fast():
        attributor = TRAKAttributor(task, ..., projector_kwargs={"proj_dim": 2048})
        attributor.cache(train_loader)
        scores = attributor.attribute(test_loader)

dattri is imported only when these functions are called.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Dict, Iterator, Union

import torch

from ..ops.projection import model_seed, project

PROJ_TYPES = {"normal": "gaussian", "rademacher": "rademacher", "sjlt": "sparse"}
# The dattri modules that import random_project by name (dattri 0.3.0).
PATCHED_MODULES = ("dattri.func.projection", "dattri.algorithm.trak", "dattri.algorithm.tracin",
                   "dattri.algorithm.dvemb")


def _original_random_project() -> Callable:
    module = importlib.import_module("dattri.func.projection")
    current = module.random_project
    return getattr(current, "_dattri_original", current)


def random_project(
    feature: Union[Dict[str, torch.Tensor], torch.Tensor],
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    proj_seed: int = 0,
    proj_type: str = "normal",
    *,
    device: Union[str, torch.device] = "cpu",
    sjlt_nnz: int = 1,
) -> Callable:
    """dattri's ``random_project``, backed by :func:`trak_fast.project` (see the module)."""
    if proj_type not in PROJ_TYPES:
        if isinstance(proj_type, str) and proj_type.split("_")[0] in ("identity", "random", "grass"):
            return _original_random_project()(feature, feature_batch_size, proj_dim, proj_max_batch_size,
                                              proj_seed, proj_type, device=device)
        raise ValueError(f"proj_type must be one of {sorted(PROJ_TYPES)} (or a type dattri handles itself: "
                         f"'identity', 'random_mask', 'grass'), got {proj_type!r}")
    kind = PROJ_TYPES[proj_type]
    if isinstance(feature_batch_size, bool) or not isinstance(feature_batch_size, int) or feature_batch_size < 0:
        raise ValueError(f"feature_batch_size must be a non-negative int, got {feature_batch_size!r}")
    if isinstance(proj_seed, bool) or not isinstance(proj_seed, int) or proj_seed < 0:
        raise ValueError(f"proj_seed must be a non-negative int, got {proj_seed!r}")
    device = torch.device(device)

    def _random_project_func(feature: Union[Dict[str, torch.Tensor], torch.Tensor],
                             ensemble_id: int = 0) -> torch.Tensor:
        pieces = feature
        if isinstance(feature, dict):
            pieces = {name: g.to(device) for name, g in feature.items()}
            dtype = next(iter(feature.values())).dtype
        else:
            pieces = feature.to(device)
            dtype = feature.dtype
        out = project(pieces, proj_dim, seed=model_seed(proj_seed, ensemble_id), kind=kind,
                      nnz=sjlt_nnz)
        return out.to(dtype)

    return _random_project_func


@contextlib.contextmanager
def use_trak_fast(*, sjlt_nnz: int = 1) -> Iterator[None]:
    """Within the block, dattri's attributors project with :func:`random_project`.

    Every module of :data:`PATCHED_MODULES` that is importable has its ``random_project``
    replaced, and restored to what it was on exit (also when the block raises)."""
    originals = {}
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "random_project"):
            originals[name] = module.random_project
    if "dattri.func.projection" not in originals:
        raise ImportError("dattri is not installed (pip install dattri==0.3.0)")
    dattri_own = originals["dattri.func.projection"]

    def patched(*args, **kwargs):
        kwargs.setdefault("sjlt_nnz", sjlt_nnz)
        return random_project(*args, **kwargs)

    patched._trak_fast = True
    patched._dattri_original = getattr(dattri_own, "_dattri_original", dattri_own)
    patched.__doc__ = random_project.__doc__
    try:
        for name in originals:
            sys.modules[name].random_project = patched
        yield
    finally:
        for name, fn in originals.items():
            sys.modules[name].random_project = fn
