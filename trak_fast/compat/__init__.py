"""Compatibility layers for code written against MadryLab's ``trak`` and its ``fast_jl`` kernel.

- :mod:`trak_fast.compat.trak`: ``TrakFastProjector``, a projector for ``TRAKer(projector=...)``.
- :mod:`trak_fast.compat.fast_jl`: ``project_{rademacher,normal}_{8,16,32}`` with fast_jl's
  signature (``import trak_fast.compat.fast_jl as fast_jl``).
- :mod:`trak_fast.compat.dattri`: ``random_project`` for dattri 0.3.0 and ``use_trak_fast()``,
  which installs it into dattri's attributors (``import trak_fast.compat.dattri``; dattri is
  imported only when they are called).

Neither module needs trak installed. ``TrakFastProjector`` is imported lazily here so that
``import trak_fast.compat.fast_jl`` never pays for importing trak.
"""
from __future__ import annotations

from typing import Any

from . import fast_jl

__all__ = ["TrakFastProjector", "fast_jl"]


def __getattr__(name: str) -> Any:
    if name == "TrakFastProjector":
        from .trak import TrakFastProjector

        return TrakFastProjector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
