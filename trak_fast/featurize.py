"""Features: projected per-example gradients of the task's model output, one checkpoint at a time.

For checkpoint ``m`` with parameters ``theta_m`` and train example ``z``::

    phi_m(z) = P_m^T grad_theta f(z; theta_m)        # [k], P_m = R_m / sqrt(k)
    Q_m(z)   = -d loss / d f  at z                   # out-to-loss weight

The per-example gradients come from :mod:`trak_fast.gradients`: module hooks in one batched
backward pass for ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` layers, and
``torch.func.vmap(grad(...))`` for every other parameter (``gradients="auto"``). Both run the
caller's module with the checkpoint's tensors through ``functional_call``; the module is never
modified (its train/eval flags are switched to eval for the call and restored, hooks removed).
The per-parameter gradients go to :func:`trak_fast.project` at their parameter's rows of P, so
no ``[B, p]`` copy is ever made; ``P_m`` is the matrix of seed ``model_seed(seed, m)``.
``projection="factored"`` replaces the dense ``P_m^T vec(G)`` by per-layer
``vec(P_out^T G P_in)`` (:mod:`trak_fast.gradients.factored`).

Memory: per-example gradients of a group of parameters take ``B x p_group`` elements. The
hook path forms one parameter's at a time, in slices of the batch of at most ``grad_memory``
bytes; the vmap path cuts the parameters into consecutive groups within ``grad_memory``
(each its own forward/backward pass) and runs a group larger than the budget on its own on
slices of the batch. Parameters outside ``grad_wrt`` are constants: their gradients are never
computed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .gradients import PROJECTIONS, TrackedModule, check_choice, plan_gradients
from .gradients.factored import FactoredMatrices, check_factored_dims, factored_layout, name_seed
from .layout import FeatureBlock, layer_blocks, layer_of, parameter_layout, per_layer_dims
from .gradients.hooks import LayerTap, backward_through_taps, tapped
from .gradients.layers import EmbeddingAdapter
from .gradients.vmap import parameter_groups, per_example_grads, slice_batch
from .projection import _check_kind, _check_nnz, model_seed, project
from .tasks import Task, get_task

Batch = Any
Device = Union[str, torch.device]

#: Bytes one group of per-example gradients (``B x p_group`` elements) may take.
DEFAULT_GRAD_MEMORY = 1 << 30
#: ``(k_out, k_in)`` per layer of ``projection="factored"`` (bergson's and LoGra's 16 x 16).
DEFAULT_FACTORED_DIMS = (16, 16)


class Features:
    """One checkpoint's train features: ``phi [n, k]``, out-to-loss weights ``out_to_loss [n]``
    (``None`` when not requested) and ``layout``, the :class:`~trak_fast.layout.FeatureBlock`
    of each group of columns. Unpacks as ``phi, out_to_loss = features``."""

    __slots__ = ("phi", "out_to_loss", "layout")

    def __init__(self, phi: torch.Tensor, out_to_loss: Optional[torch.Tensor],
                 layout: Sequence[FeatureBlock] = ()):
        self.phi, self.out_to_loss, self.layout = phi, out_to_loss, list(layout)

    def __iter__(self):
        return iter((self.phi, self.out_to_loss))

    def __repr__(self) -> str:
        return (f"Features(phi={tuple(self.phi.shape)}, out_to_loss="
                f"{None if self.out_to_loss is None else tuple(self.out_to_loss.shape)}, "
                f"{len(self.layout)} blocks)")


def _check_proj_dim(proj_dim: Optional[int]) -> None:
    if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int)
                                 or not 1 <= proj_dim < 2**31):
        raise ValueError(f"proj_dim must be an int in [1, 2**31) or None (raw gradients), got {proj_dim!r}")


def _check_grad_memory(grad_memory: int) -> None:
    if isinstance(grad_memory, bool) or not isinstance(grad_memory, int) or grad_memory < 1:
        raise ValueError(f"grad_memory must be a positive number of bytes, got {grad_memory!r}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def checkpoint_tensors(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
                       device: torch.device, where: str = "checkpoint"
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The checkpoint's ``(parameters, buffers)`` for ``functional_call``, on ``device``, detached.

    Checks the state_dict the way ``load_state_dict(strict=True)`` would (every parameter and
    persistent buffer present, nothing unexpected, shapes equal) and says what is wrong.
    Buffers the module does not save (non-persistent) are taken from the module.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{where} must be a state_dict (a mapping of names to tensors), "
                        f"got {type(checkpoint).__name__}")
    own_params = dict(model.named_parameters())
    all_param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    own_buffers = dict(model.named_buffers())
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(checkpoint))
    unexpected = sorted(set(checkpoint) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    params: Dict[str, torch.Tensor] = {}
    buffers: Dict[str, torch.Tensor] = {}
    for name, own in list(own_params.items()) + list(own_buffers.items()):
        value = checkpoint[name] if name in checkpoint else own
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != own.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, the model's "
                             f"{name} has shape {tuple(own.shape)}")
        target = params if name in all_param_names else buffers
        target[name] = value.detach().to(device=device, dtype=own.dtype)
    return params, buffers


def to_device(batch: Batch, device: torch.device) -> Batch:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


class FeatureSpec:
    """What the features of a model are, before any checkpoint is seen.

    ``plan`` (which parameters take hooks or vmap), ``grad_names`` (the differentiated
    parameters, model order), ``num_grad_params``, ``proj_dim`` (``None`` for raw gradients
    and for the factored projection), ``num_features`` (``k``), ``offsets`` (where each
    parameter starts: its first row of P for a dense projection, its first column otherwise)
    and ``layout``: the :class:`FeatureBlock` of each parameter (raw, factored) or one block
    ``"dense"``.
    """

    def __init__(self, model: torch.nn.Module, task: Task, *, proj_dim: Optional[int],
                 grad_wrt: Optional[Sequence[str]], gradients: str, projection: str,
                 factored_dims: Optional[Sequence[int]]):
        _check_proj_dim(proj_dim)
        self.factored_dims = resolve_factored_dims(projection, factored_dims)
        self.plan = plan_gradients(model, grad_param_names(model, grad_wrt), task=task,
                                   gradients=gradients, projection=projection,
                                   explicit_grad_wrt=grad_wrt is not None)
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        self.grad_names = sorted(self.plan.hooked + self.plan.vmapped, key=order.__getitem__)
        sizes = dict((name, p.numel()) for name, p in model.named_parameters())
        self.num_grad_params = sum(sizes[n] for n in self.grad_names)
        if projection == "factored":
            self.proj_dim = None
            self.layout = factored_layout(self.grad_names, self.plan.roles, self.factored_dims)
        else:
            self.proj_dim = proj_dim
            self.layout = parameter_layout(self.grad_names, [sizes[n] for n in self.grad_names])
        # Where each parameter starts: its first row of P (dense), of its layer's P_l
        # (per_layer), or its first column (raw, factored).
        self.offsets = {block.name: block.start for block in self.layout}
        self.num_features = self.layout[-1].stop
        #: per_layer: layer -> (first column, last column + 1) of its block.
        self.layer_columns: Dict[str, Tuple[int, int]] = {}
        if projection == "per_layer":
            if proj_dim is None:
                raise ValueError("projection='per_layer' splits proj_dim over the layers; "
                                 "got proj_dim=None (raw gradients are already per layer)")
            layers = layer_blocks(self.layout)
            dims = per_layer_dims({b.layer: b.stop - b.start for b in layers}, proj_dim)
            if len(dims) != len(layers):
                raise ValueError("projection='per_layer' needs each layer's parameters to be "
                                 "consecutive in the model's parameter order")
            self.offsets = {b.name: b.start - next(l.start for l in layers if l.layer == b.layer)
                            for b in self.layout}
            self.layout, column = [], 0
            for block in layers:
                k_l = dims[block.layer]
                self.layout.append(FeatureBlock(block.layer, column, column + k_l, block.layer))
                self.layer_columns[block.layer] = (column, column + k_l)
                column += k_l
            self.num_features = proj_dim
        elif self.proj_dim is not None:
            self.num_features = self.proj_dim
            self.layout = [FeatureBlock("dense", 0, self.proj_dim, "dense")]


class Featurizer:
    """Computes ``(phi [B, k], Q [B])`` for batches under one checkpoint.

    Args:
        model: the module whose forward defines the model; never modified (hooks, when used,
            are removed on exit, exceptions included).
        checkpoint: its state_dict (parameters and persistent buffers).
        task: a :class:`~trak_fast.Task` or a built-in task name.
        proj_dim: ``k`` of the dense projection; ``None`` keeps the raw gradients (``k = p``,
            parameter order). Not used by ``projection="factored"``.
        kind, seed, model_id: the projection matrix ``P_m``, seed ``model_seed(seed, model_id)``.
        nnz: nonzeros per row for ``kind="sparse"`` (dense projection only).
        grad_wrt: names of the parameters to differentiate (``None``: all), in model order.
        device: where gradients are computed (``None``: the model's parameter device).
        grad_memory: bytes one group of per-example gradients may take.
        gradients: ``"auto"`` (hooks where they apply), ``"hooks"`` or ``"vmap"``; see
            :func:`trak_fast.gradients.plan_gradients`. Both give the same features up to
            float32 rounding.
        projection: ``"dense"`` (``P_m^T vec(grad)``) or ``"factored"`` (per layer
            ``vec(P_out^T G P_in)``, see :mod:`trak_fast.gradients.factored`).
        factored_dims: ``(k_out, k_in)`` per layer for ``projection="factored"``.

    ``num_features`` is ``k``; ``layout`` lists the :class:`FeatureBlock` of each parameter
    (its name and columns) for the factored projection and raw gradients, and one block
    ``"dense"`` for a dense projection.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], *,
                 task: Union[str, Task] = "classification", proj_dim: Optional[int] = 2048,
                 kind: str = "rademacher", seed: int = 0, model_id: int = 0,
                 grad_wrt: Optional[Sequence[str]] = None, device: Optional[Device] = None,
                 grad_memory: int = DEFAULT_GRAD_MEMORY, gradients: str = "auto",
                 projection: str = "dense", factored_dims: Optional[Sequence[int]] = None,
                 nnz: int = 4):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_grad_memory(grad_memory)
        self.model = model
        self.task = get_task(task)
        self.kind = kind
        self.nnz = nnz
        self.seed = model_seed(seed, model_id)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.grad_memory = grad_memory
        self.params, self.buffers = checkpoint_tensors(model, checkpoint, self.device,
                                                       where=f"checkpoint {model_id}")
        self.projection = projection
        spec = FeatureSpec(model, self.task, proj_dim=proj_dim, grad_wrt=grad_wrt,
                           gradients=gradients, projection=projection, factored_dims=factored_dims)
        kind_id = _check_kind(kind)
        if spec.proj_dim is not None:
            _check_nnz(nnz, kind_id, spec.proj_dim)
        if kind == "sparse" and projection == "factored":
            raise ValueError("kind='sparse' is a dense projection kind; projection='factored' "
                             "takes kind='rademacher' or 'gaussian'")
        self.plan, self.factored_dims = spec.plan, spec.factored_dims
        self.grad_names, self.num_grad_params = spec.grad_names, spec.num_grad_params
        self.proj_dim, self.num_features, self.layout = spec.proj_dim, spec.num_features, spec.layout
        self.offsets, self.layer_columns = spec.offsets, spec.layer_columns
        self.dtype = (torch.float64 if any(self.params[n].dtype == torch.float64
                                           for n in self.grad_names) else torch.float32)
        if projection == "factored":
            self.matrices = FactoredMatrices(self.seed, kind, self.factored_dims, self.plan.dims,
                                             self.device, self.dtype)

    def _model_fn(self, params: Mapping[str, torch.Tensor]):
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.func.functional_call(self.model, (params, self.buffers), args, kwargs)
        return run

    def out_to_loss(self, batch: Batch) -> torch.Tensor:
        """``Q [B]`` (float32) from one batched forward pass with the checkpoint."""
        with torch.no_grad():
            q = self.task.out_to_loss(self._model_fn(self.params), batch)
        return q.detach().reshape(-1).float()

    # ---- writing gradients into the features -------------------------------------------------

    def _emit(self, grad: torch.Tensor, name: str, phi: torch.Tensor, start: int, stop: int) -> None:
        """Adds the per-example gradients ``grad [rows, ...]`` of parameter ``name`` into
        ``phi[start:stop]``: projected at the parameter's rows of P, or as raw columns."""
        if self.proj_dim is None:
            column = self.offsets[name]
            width = grad[0].numel()
            phi[start:stop, column:column + width] += grad.reshape(stop - start, width).to(phi.dtype)
        elif self.layer_columns:
            layer = layer_of(name)
            c0, c1 = self.layer_columns[layer]
            phi[start:stop, c0:c1] += project([grad], c1 - c0, seed=name_seed(self.seed, layer),
                                              kind=self.kind, nnz=self.nnz,
                                              feature_offset=self.offsets[name])
        else:
            project([grad], self.proj_dim, seed=self.seed, kind=self.kind, nnz=self.nnz,
                    feature_offset=self.offsets[name], out=phi[start:stop])

    def _budget(self) -> int:
        return max(1, self.grad_memory // (8 if self.dtype == torch.float64 else 4))

    def _vmap_features(self, batch: Batch, batch_size: int, phi: torch.Tensor) -> None:
        names = self.plan.vmapped
        # torch.func forms each use's gradient of a tied parameter before summing them, so a
        # parameter registered in u modules counts u times against the budget.
        sizes = [self.params[n].numel() * self.plan.uses[n] for n in names]
        budget = self._budget()
        for group in parameter_groups(sizes, max(1, budget // batch_size)):
            group_names = [names[i] for i in group]
            rows = max(1, min(batch_size, budget // sum(sizes[i] for i in group)))
            for start in range(0, batch_size, rows):
                stop = min(batch_size, start + rows)
                part = batch if (start, stop) == (0, batch_size) else slice_batch(batch, start, stop)
                grads = per_example_grads(self._model_fn, self.task, self.params, group_names, part)
                if self.proj_dim is None or self.layer_columns:
                    for name in group_names:
                        self._emit(grads[name], name, phi, start, stop)
                    del grads
                    continue
                # One call per run of parameters that are consecutive rows of P (hooked
                # parameters between them break a run).
                for run in self._consecutive_runs(group_names):
                    project([grads[n] for n in run], self.proj_dim, seed=self.seed,
                            kind=self.kind, nnz=self.nnz, feature_offset=self.offsets[run[0]],
                            out=phi[start:stop])
                del grads       # before the next slice's gradients exist

    def _consecutive_runs(self, names: List[str]) -> List[List[str]]:
        runs: List[List[str]] = []
        for name in names:
            previous = runs[-1][-1] if runs else None
            if previous is not None and \
                    self.offsets[previous] + self.params[previous].numel() == self.offsets[name]:
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs

    def _taps(self, phi: torch.Tensor, batch_size: int) -> List[LayerTap]:
        taps = []
        for tracked in self.plan.modules:
            if self.projection == "factored":
                taps.append(self._factored_tap(tracked, phi))
            else:
                taps.append(self._dense_tap(tracked, phi, batch_size))
        return taps

    def _dense_tap(self, tracked: TrackedModule, phi: torch.Tensor, batch_size: int) -> LayerTap:
        """Exact per-example gradients of one layer, in row chunks within ``grad_memory``."""
        adapter, budget = tracked.adapter, self._budget()

        def on_grad(inputs: torch.Tensor, grad: torch.Tensor) -> None:
            for role, name in tracked.params:
                if isinstance(adapter, EmbeddingAdapter) and self.proj_dim is not None \
                        and not self.layer_columns:
                    self._emit_embedding_rows(adapter, inputs, grad, name, phi)
                    continue
                rows = max(1, min(batch_size, budget // self.params[name].numel()))
                for start in range(0, batch_size, rows):
                    stop = min(batch_size, start + rows)
                    g = (adapter.weight_grad(inputs[start:stop], grad[start:stop])
                         if role == "weight" else adapter.bias_grad(grad[start:stop]))
                    self._emit(g, name, phi, start, stop)
                    del g       # before the next chunk exists: one chunk at a time
        return LayerTap(tracked.module, adapter, lambda inputs: inputs, on_grad)

    def _emit_embedding_rows(self, adapter: EmbeddingAdapter, ids: torch.Tensor,
                             grad: torch.Tensor, name: str, phi: torch.Tensor) -> None:
        """An embedding's per-example gradient has a nonzero row only per id in the example:
        ``P^T G_b = sum_v P_v^T G_b[v]`` over the batch's distinct ids ``v`` (``P_v`` the d rows
        of P of table row v), one ``project`` call per run of consecutive ids. That costs
        ``O(U d k)`` for U distinct ids instead of the table's ``O(V d k)``."""
        batch, d = grad.shape[0], adapter.d_out
        ids = ids.reshape(batch, -1)
        delta = grad.reshape(batch, -1, d).to(phi.dtype)
        if adapter.module.padding_idx is not None:
            delta = delta.masked_fill((ids == adapter.module.padding_idx)[..., None], 0)
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = delta.new_zeros(batch, len(unique), d).scatter_add_(
            1, inverse[..., None].expand(-1, -1, d), delta)                 # [B, U, d]
        values = unique.tolist()
        start = 0
        for stop in range(1, len(values) + 1):
            if stop == len(values) or values[stop] != values[stop - 1] + 1:
                project([rows[:, start:stop].reshape(batch, -1)], self.proj_dim, seed=self.seed,
                        kind=self.kind, nnz=self.nnz, feature_offset=self.offsets[name] + values[start] * d,
                        out=phi)
                start = stop

    def _factored_tap(self, tracked: TrackedModule, phi: torch.Tensor) -> LayerTap:
        """``P_in^T a`` in the forward pass, ``P_out^T delta`` and their product in the backward."""
        adapter = tracked.adapter
        p_out, p_in = self.matrices.p_out[tracked.key], self.matrices.p_in[tracked.key]
        wants_weight = any(role == "weight" for role, _ in tracked.params)

        def on_input(inputs: torch.Tensor) -> Optional[torch.Tensor]:
            return adapter.project_tokens(inputs, p_in) if wants_weight else None

        def on_grad(a_in: Optional[torch.Tensor], grad: torch.Tensor) -> None:
            d_out = adapter.output_grads(grad).to(p_out.dtype) @ p_out           # [B, T, k_out]
            for role, name in tracked.params:
                start = self.offsets[name]
                if role == "weight":
                    block = torch.bmm(d_out.transpose(1, 2), a_in)               # [B, k_out, k_in]
                else:
                    block = d_out.sum(1)                                         # [B, k_out]
                width = block[0].numel()
                phi[:, start:start + width] += block.reshape(block.shape[0], width).to(phi.dtype)
        return LayerTap(tracked.module, adapter, on_input, on_grad)

    def _hook_features(self, batch: Batch, batch_size: int, phi: torch.Tensor
                       ) -> Tuple[torch.Tensor, List[torch.nn.Module]]:
        """One batched forward and backward pass; returns ``Q`` from the same forward and the
        tracked modules that did not see the batch (nothing was emitted for any module then
        only if that list is empty: the caller redoes the batch)."""
        with tapped(self._taps(phi, batch_size), self.device, batch_size) as (anchor, skipped), \
                torch.enable_grad():
            f, q = self.task.batched_outputs_and_out_to_loss(self._model_fn(self.params), batch)
            if not isinstance(f, torch.Tensor) or f.shape != (batch_size,):
                raise ValueError(f"task.outputs must return shape [{batch_size}], got "
                                 f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
            backward_through_taps(f.sum(), anchor)
        return q.detach().reshape(-1).float(), skipped

    def _move_to_vmap(self, modules: List[torch.nn.Module]) -> None:
        """Sends the parameters of modules that did not see the batch (and any parameter tied
        to them) to the vmap path, for this and every later batch."""
        if self.projection == "factored":
            raise ValueError(f"projection='factored': {type(modules[0]).__name__} layers are "
                             "applied to something other than the batch (e.g. a broadcast "
                             "input), so they have no per-example factored form")
        moved = {name for t in self.plan.modules if any(t.module is m for m in modules)
                 for _, name in t.params}
        # A tied parameter also registered in a module that did see the batch must move too.
        keep = [t for t in self.plan.modules if not any(name in moved for _, name in t.params)]
        moved |= {name for t in self.plan.modules if t not in keep for _, name in t.params}
        order = {name: i for i, name in enumerate(self.grad_names)}
        self.plan = self.plan._replace(
            hooked=[n for n in self.plan.hooked if n not in moved],
            vmapped=sorted(self.plan.vmapped + sorted(moved), key=order.__getitem__),
            modules=keep)

    def features_and_out_to_loss(self, batch: Batch, batch_size: int
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(phi [B, k], Q [B])`` for one batch: the hook pass, then the vmap groups."""
        phi = torch.zeros(batch_size, self.num_features, dtype=self.dtype, device=self.device)
        if self.plan.hooked:
            q, skipped = self._hook_features(batch, batch_size, phi)
            while skipped:        # found on the first batch only: redo it with the new plan
                self._move_to_vmap(skipped)
                phi.zero_()
                q, skipped = self._hook_features(batch, batch_size, phi) if self.plan.hooked \
                    else (self.out_to_loss(batch), [])
        else:
            q = self.out_to_loss(batch)     # first: validates the batch against the model cheaply
        if self.plan.vmapped:
            self._vmap_features(batch, batch_size, phi)
        return phi, q

    def features(self, batch: Batch, batch_size: int) -> torch.Tensor:
        """``phi [B, k]``: the projected (or raw) per-example gradients of one batch."""
        return self.features_and_out_to_loss(batch, batch_size)[0]

    def __call__(self, batch: Batch, *, where: str = "batch",
                 out_to_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(phi [B, k], Q [B] or None)`` for one batch, after validating it."""
        size = self.task.check_batch(batch, where)
        if size == 0:
            raise ValueError(f"{where} is empty (batch size 0)")
        batch = to_device(batch, self.device)
        with eval_mode(self.model):
            try:
                phi, q = self.features_and_out_to_loss(batch, size)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from exc
            except RuntimeError as exc:
                raise RuntimeError(f"{where}: the model or task failed on this batch "
                                   f"(shapes {_shapes(batch)}): {exc}") from exc
        if q.shape != (size,):
            raise ValueError(f"{where}: task.out_to_loss must return shape [{size}], got "
                             f"{tuple(q.shape)}")
        return phi, (q if out_to_loss else None)


def resolve_factored_dims(projection: str, factored_dims: Optional[Sequence[int]]
                          ) -> Optional[Tuple[int, int]]:
    """``factored_dims`` checked: required pair for ``"factored"``, absent for ``"dense"``."""
    check_choice("projection", projection, PROJECTIONS)
    if projection != "factored":
        if factored_dims is not None:
            raise ValueError("factored_dims is only used with projection='factored', got "
                             f"factored_dims={factored_dims!r} with projection={projection!r}")
        return None
    return check_factored_dims(DEFAULT_FACTORED_DIMS if factored_dims is None else factored_dims)


def _shapes(batch: Batch) -> List[Tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def grad_param_names(model: torch.nn.Module, grad_wrt: Optional[Iterable[str]]) -> List[str]:
    """The names of the differentiated parameters, in the model's parameter order."""
    names = [name for name, _ in model.named_parameters()]
    if grad_wrt is None:
        return names
    if isinstance(grad_wrt, str):
        raise TypeError(f"grad_wrt must be a list of parameter names, got the string {grad_wrt!r}")
    wanted = list(grad_wrt)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"grad_wrt names parameters the model does not have: {unknown}; "
                         f"its parameters are {names[:8]}{' ...' if len(names) > 8 else ''}")
    if not wanted:
        raise ValueError("grad_wrt must name at least one parameter, got an empty list")
    return [name for name in names if name in set(wanted)]


def _batches(loader: Iterable[Batch], what: str, progress: bool, total: Optional[int]) -> Iterator[Batch]:
    try:
        iterator = iter(loader)
    except TypeError as exc:
        raise TypeError(f"{what} must be an iterable of batches, got {type(loader).__name__}") from exc
    return iter(tqdm(iterator, desc=what, unit="batch", disable=not progress, total=total,
                     leave=False))


def _loader_length(loader: Iterable[Batch]) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def featurize(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
              batches: Iterable[Batch], *, task: Union[str, Task] = "classification",
              proj_dim: Optional[int] = 2048, kind: str = "rademacher", seed: int = 0,
              model_id: int = 0, grad_wrt: Optional[Sequence[str]] = None,
              device: Optional[Device] = None, grad_memory: int = DEFAULT_GRAD_MEMORY,
              gradients: str = "auto", projection: str = "dense",
              factored_dims: Optional[Sequence[int]] = None,
              progress: bool = False, out_to_loss: bool = True, what: str = "train",
              before_batch: Optional[Callable[[str, int, Batch], None]] = None,
              nnz: int = 4) -> Features:
    """Features of every example in ``batches`` under one checkpoint, in memory.

    Returns ``Features(phi [n, k], out_to_loss [n])`` on the CPU: ``phi`` float32 (float64 for
    a float64 model), ``phi[i] = P_m^T grad f(z_i)`` with ``P_m`` scaled by ``1/sqrt(k)`` so
    that ``E ||phi_i||^2 = ||grad f(z_i)||^2``; raw gradients when ``proj_dim=None``.
    ``out_to_loss`` is ``None`` when not requested. A gradient dot product baseline is
    ``featurize(...).phi @ target_features(...).T``. ``gradients``, ``projection`` and
    ``factored_dims`` as in :class:`Featurizer`.

    ``before_batch(where, first_row, batch)``, if given, is called before each batch is
    featurized (e.g. a :class:`trak_fast.fingerprint.Ledger` that raises on a reordered loader).
    """
    from .checks import compute_device     # here: checks imports this module
    featurizer = Featurizer(model, checkpoint, task=task, proj_dim=proj_dim, kind=kind, seed=seed,
                            model_id=model_id, grad_wrt=grad_wrt,
                            device=compute_device(model, device)
                            if isinstance(model, torch.nn.Module) else device,
                            grad_memory=grad_memory, gradients=gradients, projection=projection,
                            factored_dims=factored_dims, nnz=nnz)
    phis: List[torch.Tensor] = []
    qs: List[torch.Tensor] = []
    shapes = None
    rows = 0
    for index, batch in enumerate(_batches(batches, what, progress, _loader_length(batches))):
        where = f"{what} batch {index}"
        if featurizer.task.fixed_shapes:
            shapes = _check_same_shapes(batch, shapes, where)
        if before_batch is not None:
            featurizer.task.check_batch(batch, where)     # a malformed batch is reported as such
            before_batch(where, rows, batch)
        phi, q = featurizer(batch, where=where, out_to_loss=out_to_loss)
        rows += phi.shape[0]
        phis.append(phi.cpu())
        if q is not None:
            qs.append(q.cpu())
    if not phis:
        raise ValueError(f"{what} yielded no batches: expected an iterable of batches "
                         "(a list or a DataLoader that can be iterated again for every checkpoint)")
    return Features(torch.cat(phis), torch.cat(qs) if out_to_loss else None, featurizer.layout)


def target_features(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
                    batches: Iterable[Batch], **kwargs: Any) -> torch.Tensor:
    """``phi [n_targets, k]`` for target examples (same arguments as :func:`featurize`)."""
    kwargs.setdefault("what", "targets")
    return featurize(model, checkpoint, batches, out_to_loss=False, **kwargs).phi


def _check_same_shapes(batch: Batch, previous: Optional[List[Tuple[int, ...]]], where: str
                       ) -> List[Tuple[int, ...]]:
    """Per-example shapes (all but the batch dimension) must agree from batch to batch.

    Catches a loader whose examples change shape (e.g. a wrong transform) before the model
    fails on it with an unrelated message. Tasks with variable-length inputs (padded text)
    set ``Task.fixed_shapes = False`` to skip the check.
    """
    shapes = [tuple(t.shape[1:]) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if previous is not None and shapes != previous:
        raise ValueError(f"{where}: per-example shapes {shapes} differ from those of the first "
                         f"batch {previous}; every batch of a loader must hold examples of one shape")
    return shapes


def num_grad_params(model: torch.nn.Module, grad_wrt: Optional[Sequence[str]] = None) -> int:
    """``p``: the number of differentiated parameters (all, or those named in ``grad_wrt``)."""
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in grad_param_names(model, grad_wrt))
