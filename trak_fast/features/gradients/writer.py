"""Where per-example gradients go: ``phi[rows] += P^T g`` at the parameter's rows of P.

Every strategy hands its per-example gradients to one :class:`FeatureWriter`, which knows the
feature space (:class:`~trak_fast.features.spec.FeatureSpec`) and writes them in place:

- dense projection: ``phi += P^T g`` with ``g`` at rows ``offsets[name] ...`` of the one
  ``P_m`` (seed ``model_seed(seed, m)``), by :func:`trak_fast.project`, which never copies the
  pieces into one ``[B, p]`` buffer;
- ``projection="per_layer"``: the same into the layer's columns, with the layer's own matrix
  (seed ``name_seed(seed_m, layer)``);
- raw gradients (``proj_dim=None``): the gradient itself, at the parameter's columns.

With :attr:`FeatureWriter.moments` set (``optimizer_state=``, :mod:`.second_moment`), every
piece is first divided by the optimizer's ``sqrt(v_hat) + eps``, exactly.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence, Tuple

import torch

from ...ops.projection import project
from ..layout import layer_of
from .factored import name_seed


class FeatureWriter:
    """Adds per-example gradients into feature rows (see the module docstring)."""

    def __init__(self, spec, seed: int, kind: str, nnz: int, sizes: Mapping[str, int]):
        self.spec, self.seed, self.kind, self.nnz = spec, seed, kind, nnz
        self.sizes = dict(sizes)       # parameter name -> numel
        self._pending: List[Tuple[int, torch.Tensor]] = []     # (first row of P, values [B, n])
        self._pending_elements = 0
        #: :class:`~.second_moment.SecondMoments` to divide each piece by, or None.
        self.moments = None

    @property
    def dense(self) -> bool:
        """One dense ``P`` over all parameters: any rows of it can be projected on their own."""
        return self.spec.proj_dim is not None and not self.spec.layer_columns

    def add(self, grad: torch.Tensor, name: str, phi: torch.Tensor, start: int, stop: int) -> None:
        """``phi[start:stop] += P^T grad``, ``grad [stop - start, *shape]`` of parameter ``name``."""
        spec = self.spec
        if self.moments is not None:
            grad = self.moments.scale(grad, name)
        if spec.proj_dim is None:
            column, width = spec.offsets[name], self.sizes[name]
            phi[start:stop, column:column + width] += grad.reshape(stop - start, width).to(phi.dtype)
        elif spec.layer_columns:
            layer = layer_of(name)
            c0, c1 = spec.layer_columns[layer]
            phi[start:stop, c0:c1] += project([grad], c1 - c0, seed=name_seed(self.seed, layer),
                                              kind=self.kind, nnz=self.nnz,
                                              feature_offset=spec.offsets[name])
        else:
            project([grad], spec.proj_dim, seed=self.seed, kind=self.kind, nnz=self.nnz,
                    feature_offset=spec.offsets[name], out=phi[start:stop])

    def add_many(self, grads: Mapping[str, torch.Tensor], names: Sequence[str], phi: torch.Tensor,
                 start: int, stop: int) -> None:
        """:meth:`add` for several parameters; one ``project`` call per run of parameters whose
        rows of P are consecutive (parameters of other strategies between them break a run)."""
        if not self.dense:
            for name in names:
                self.add(grads[name], name, phi, start, stop)
            return
        if self.moments is not None:
            grads = {n: self.moments.scale(grads[n], n) for n in names}
        for run in self._consecutive_runs(names):
            project([grads[n] for n in run], self.spec.proj_dim, seed=self.seed, kind=self.kind,
                    nnz=self.nnz, feature_offset=self.spec.offsets[run[0]], out=phi[start:stop])

    def add_rows(self, values: torch.Tensor, name: str, first: int, phi: torch.Tensor) -> None:
        """``phi += P[rows]^T values`` for ``values [B, m]``: the per-example gradient of
        parameter ``name`` restricted to its flat entries ``first ... first + m - 1`` (zero
        elsewhere). Dense projection only (see :attr:`dense`)."""
        if self.moments is not None:
            values = self.moments.scale_flat(values, name, first)
        project([values], self.spec.proj_dim, seed=self.seed, kind=self.kind, nnz=self.nnz,
                feature_offset=self.spec.offsets[name] + first, out=phi)

    def defer_rows(self, values: torch.Tensor, name: str, first: int, phi: torch.Tensor,
                   budget: int) -> None:
        """:meth:`add_rows` for the whole batch, held back and sent with other pieces in as few
        ``project`` calls as possible: when the held pieces exceed ``budget`` elements, and at
        :meth:`flush`. Pieces at consecutive rows of P (a layer's weight and bias, consecutive
        layers) go in one call, so each call's fixed cost is paid once per run of pieces."""
        if self.moments is not None:
            values = self.moments.scale_flat(values, name, first)
        self._pending.append((self.spec.offsets[name] + first, values))
        self._pending_elements += values.numel()
        if self._pending_elements > budget:
            self.flush(phi)

    def discard(self) -> None:
        """Drops the held pieces (their batch failed)."""
        self._pending, self._pending_elements = [], 0

    def flush(self, phi: torch.Tensor) -> None:
        """Projects every held piece into ``phi`` (see :meth:`defer_rows`)."""
        pending = sorted(self._pending, key=lambda item: item[0])
        self._pending, self._pending_elements = [], 0
        run: List[torch.Tensor] = []
        start = end = None
        for offset, values in pending + [(None, None)]:
            if run and offset != end:
                project(run, self.spec.proj_dim, seed=self.seed, kind=self.kind, nnz=self.nnz,
                        feature_offset=start, out=phi)
                run = []
            if offset is None:
                break
            if not run:
                start = offset
            run.append(values)
            end = offset + values.shape[1]

    def _consecutive_runs(self, names: Sequence[str]) -> List[List[str]]:
        runs: List[List[str]] = []
        offsets = self.spec.offsets
        for name in names:
            previous = runs[-1][-1] if runs else None
            if previous is not None and offsets[previous] + self.sizes[previous] == offsets[name]:
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs
