"""The featurizer: one checkpoint's features of one batch, ``(phi [B, k], Q [B])``.

For checkpoint ``m`` with parameters ``theta_m`` and train example ``z``::

    phi_m(z) = P_m^T grad_theta f(z; theta_m)        # [k], P_m = R_m / sqrt(k)
    Q_m(z)   = -d loss / d f  at z                   # out-to-loss weight

The per-example gradients come from the strategies of :mod:`trak_fast.features.gradients`:
one batched forward and backward pass with hooks for the layers an adapter knows (dense or
factored), then ``torch.func.vmap`` for every other parameter. All of them run the caller's
module with the checkpoint's tensors through ``functional_call``; the module is never modified
(its train/eval flags are switched to eval for the call and restored, hooks removed).

Memory: per-example gradients of a group of parameters take ``B x p_group`` elements, at most
``grad_memory`` bytes (:class:`~trak_fast.settings.FeatureSettings`): the hook strategy forms
one parameter's at a time in slices of the batch, the vmap strategy cuts the parameters into
groups within the budget. Parameters outside ``grad_wrt`` are constants: their gradients are
never computed.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from ..ops.projection import model_seed
from ..settings import FeatureSettings, feature_settings
from .gradients import describe_paths, gradient_paths, without_modules
from .gradients.dense import dense_tap
from .gradients.factored import FactoredMatrices, factored_tap
from .gradients.hook_pass import hooked_pass, hooked_passes
from .gradients.hooks import LayerTap, position_chunks
from .gradients.second_moment import SecondMoments
from .gradients.vmap import vmap_features
from .gradients.writer import FeatureWriter
from .model import Batch, Device, checkpoint_tensors, eval_mode, model_device, to_device
from .spec import FeatureSpec
from .tasks import Task, get_task
from .tasks.likelihood import LogLikelihoodTask, SampledLogLikelihoodTask, drawing

logger = logging.getLogger("trak_fast")
#: Path summaries already logged (once per process and model, not once per checkpoint).
_LOGGED: set = set()


class Featurizer:
    """Computes ``(phi [B, k], Q [B])`` for batches under one checkpoint.

    Args:
        model: the module whose forward defines the model; never modified.
        checkpoint: its state_dict (parameters and persistent buffers).
        task: a :class:`~trak_fast.Task` or a built-in task name.
        settings: the :class:`~trak_fast.FeatureSettings`; keyword ``options`` (``proj_dim=``,
            ``projection=``, ...) build or override them.
        model_id: the checkpoint's index: ``P_m`` has seed ``model_seed(settings.seed, model_id)``.
        device: where gradients are computed (``None``: the model's parameter device).
        spec: the :class:`~trak_fast.features.spec.FeatureSpec` of ``model``, ``task`` and
            ``settings``, when the caller has it already (one per model, not per checkpoint).
        position_chunks: ``C > 1`` gives ``C`` feature rows per example, one per chunk of
            its positions, laid side by side (``phi [B, C k]``; see
            :func:`~trak_fast.features.gradients.hooks.position_chunks`): the Fisher rows of
            :class:`FisherFeaturizer`. Hook path only.
        optimizer_state: this checkpoint's Adam state (``optimizer.state_dict()``, or
            ``{name: v_hat}``): every per-example gradient is divided by ``sqrt(v_hat) + eps``
            before it is projected (:mod:`trak_fast.features.gradients.second_moment`; exact,
            except the rank-one form of a weight's in ``projection="factored"``).

    ``num_features`` is ``k``; ``layout`` lists the :class:`FeatureBlock` of each group of
    columns; ``plan`` says which parameters take hooks and which vmap.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], *,
                 task: Union[str, Task] = "classification",
                 settings: Optional[FeatureSettings] = None, model_id: int = 0,
                 device: Optional[Device] = None, spec: Optional[FeatureSpec] = None,
                 position_chunks: int = 1, optimizer_state: Any = None, **options: Any):
        self.task = get_task(task)
        settings = feature_settings(options, settings, where="Featurizer()", task=self.task)
        if spec is None:
            spec = FeatureSpec(model, self.task, settings)
        elif spec.settings != settings:
            raise ValueError("spec was built for other feature settings than settings")
        self.model, self.settings, self.spec = model, settings, spec
        self.chunks = position_chunks
        self.seed = model_seed(settings.seed, model_id)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.params, self.buffers = checkpoint_tensors(model, checkpoint, self.device,
                                                       where=f"checkpoint {model_id}")
        self.plan = spec.plan
        self.dtype = (torch.float64 if any(self.params[n].dtype == torch.float64
                                           for n in spec.grad_names) else torch.float32)
        self.writer = FeatureWriter(spec, self.seed, settings.kind, settings.nnz, spec.sizes)
        if settings.projection == "factored":
            self.matrices = FactoredMatrices(self.seed, settings.kind, spec.factored_dims,
                                             self.plan.dims, self.device, self.dtype)
        self.moments = None
        if optimizer_state is not None:
            self.moments = SecondMoments.from_state(
                optimizer_state, model, spec.grad_names, self.device, self.dtype,
                where=f"optimizer_state of checkpoint {model_id}")
            self.writer.moments = self.moments
            if settings.projection == "factored":
                self.matrices.scale_rows(self.moments, self.plan.modules)

    # The feature space, as the spec says.
    grad_names = property(lambda self: self.spec.grad_names)
    num_grad_params = property(lambda self: self.spec.num_grad_params)
    num_features = property(lambda self: self.spec.num_features)
    layout = property(lambda self: self.spec.layout)
    proj_dim = property(lambda self: self.spec.proj_dim)
    offsets = property(lambda self: self.spec.offsets)
    layer_columns = property(lambda self: self.spec.layer_columns)
    factored_dims = property(lambda self: self.spec.factored_dims)

    def _model_fn(self, params: Mapping[str, torch.Tensor]):
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.func.functional_call(self.model, (params, self.buffers), args, kwargs)
        return run

    @property
    def run(self):
        """The model with this checkpoint's tensors: ``run(*args, **kwargs)`` calls forward."""
        return self._model_fn(self.params)

    def _budget(self) -> int:
        """Gradient elements within ``grad_memory``."""
        return max(1, self.settings.grad_memory // (8 if self.dtype == torch.float64 else 4))

    def out_to_loss(self, batch: Batch) -> torch.Tensor:
        """``Q [B]`` (float32) from one batched forward pass with the checkpoint."""
        with torch.no_grad():
            q = self.task.out_to_loss(self._model_fn(self.params), batch)
        return q.detach().reshape(-1).float()

    # ---- the strategies -----------------------------------------------------------------------

    def _taps(self, phi: torch.Tensor, batch_size: int) -> List[LayerTap]:
        rows = batch_size * self.chunks           # phi's rows: one per (example, chunk)
        if self.settings.projection == "factored":
            taps = [factored_tap(t, self.matrices, self.spec.offsets, phi) for t in self.plan.modules]
        else:
            taps = [dense_tap(t, self.writer, phi, rows, self._budget()) for t in self.plan.modules]
        return [position_chunks(tap, self.chunks) for tap in taps]

    def _hook_features(self, batch: Batch, batch_size: int, phi: torch.Tensor):
        try:
            result = hooked_pass(self._taps(phi, batch_size), self.task,
                                 self._model_fn(self.params), batch, batch_size, self.device)
        except BaseException:
            self.writer.discard()
            raise
        self.writer.flush(phi)     # the dense taps' held pieces
        return result

    def _vmap_features(self, batch: Batch, batch_size: int, phi: torch.Tensor) -> None:
        vmap_features(self._model_fn, self.task, self.params, self.plan.vmapped, self.plan.uses,
                      batch, batch_size, phi, self.writer, self._budget())

    @property
    def gradient_paths(self):
        """``{"hooks": [...], "vmap": [...], "left_out": [...]}``: the path of each parameter
        (final after the first batch, which finds tables applied to a broadcast input)."""
        return gradient_paths(self.plan)

    def _run_vmap(self, batch: Batch, batch_size: int, phi: torch.Tensor) -> None:
        try:
            self._vmap_features(batch, batch_size, phi)
        except RuntimeError as exc:
            if "vmap" not in str(exc) and "functorch" not in str(exc):
                raise
            names = self.plan.vmapped
            control_flow = "data-dependent control flow" in str(exc)
            error = RuntimeError(
                f"{len(names)} parameters have no hook adapter and take the vmap path "
                f"({names[:6]}{' ...' if len(names) > 6 else ''}), but this model cannot run "
                "under torch.func.vmap ("
                + ("its forward has data-dependent control flow, e.g. attention-mask code"
                   if control_flow else f"{type(exc).__name__} from torch.func") + "). Two ways "
                "out: leave them out with grad_wrt=[the other parameter names], or make their "
                "layers ones trak_fast has adapters for (nn.Linear, Conv1D, nn.Conv2d, "
                "nn.Embedding, nn.LayerNorm, RMSNorm kin).")
            if control_flow:        # torch's own message asks to report a torch bug: it is not one
                raise error from None
            raise error from exc

    def _log_paths(self) -> None:
        line = describe_paths(self.plan, self.spec.sizes)
        if (id(self.model), line) not in _LOGGED:
            _LOGGED.add((id(self.model), line))
            logger.info("trak_fast per-example gradients: %s", line)

    def _move_to_vmap(self, modules: List[torch.nn.Module]) -> None:
        """Sends the parameters of modules that did not see the batch to the vmap path, for
        this and every later batch."""
        if self.settings.projection == "factored":
            raise ValueError(f"projection='factored': {type(modules[0]).__name__} layers are "
                             "applied to something other than the batch (e.g. a broadcast "
                             "input), so they have no per-example factored form")
        self.plan = without_modules(self.plan, modules, self.spec.grad_names)

    def features_and_out_to_loss(self, batch: Batch, batch_size: int
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(phi [B, k], Q [B])`` for one batch on the device: the hook pass, then vmap
        (``phi [B, C k]`` with ``position_chunks = C``)."""
        phi = torch.zeros(batch_size * self.chunks, self.num_features, dtype=self.dtype,
                          device=self.device)
        if self.plan.hooked:
            q, skipped = self._hook_features(batch, batch_size, phi)
            while skipped:        # found on the first batch only: redo it with the new plan
                self._move_to_vmap(skipped)
                phi.zero_()
                q, skipped = self._hook_features(batch, batch_size, phi) if self.plan.hooked \
                    else (self.out_to_loss(batch), [])
        else:
            q = self.out_to_loss(batch)     # first: validates the batch against the model cheaply
        self._log_paths()
        if self.plan.vmapped:
            if self.chunks > 1:
                raise ValueError(
                    f"Fisher rows per chunk of positions (fisher_chunks={self.chunks}) need every "
                    f"parameter on the hook path; {self.plan.vmapped[:4]} take vmap. Use "
                    "projection='factored' (which leaves them out), grad_wrt= without them, or "
                    "a task with fisher_chunks=1")
            self._run_vmap(batch, batch_size, phi)
        return phi.reshape(batch_size, -1), q

    def compute(self, batch: Batch, size: int, *, where: str = "batch",
                out_to_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(phi [B, k], Q [B] or None)`` for one batch already checked by the loop
        (:func:`trak_fast.features.loop.batches`), with errors that name the batch."""
        batch = to_device(batch, self.device)
        with eval_mode(self.model), naming_the_batch(where, batch):
            phi, q = self.features_and_out_to_loss(batch, size)
        if q.shape != (size,):
            raise ValueError(f"{where}: task.out_to_loss must return shape [{size}], got "
                             f"{tuple(q.shape)}")
        return phi, (q if out_to_loss else None)

    def __call__(self, batch: Batch, *, where: str = "batch",
                 out_to_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(phi [B, k], Q [B] or None)`` for one batch, after validating it."""
        size = self.task.check_batch(batch, where)
        if size == 0:
            raise ValueError(f"{where} is empty (batch size 0)")
        return self.compute(batch, size, where=where, out_to_loss=out_to_loss)


@contextlib.contextmanager
def naming_the_batch(where: str, batch: Batch) -> Iterator[None]:
    """Re-raises a ValueError or TypeError with ``where`` in front, and a RuntimeError (the
    model or the task failing) with ``where`` and the batch's shapes."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except RuntimeError as exc:
        raise RuntimeError(f"{where}: the model or task failed on this batch "
                           f"(shapes {_shapes(batch)}): {exc}") from exc


def _shapes(batch: Batch) -> List[Tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]


class FisherFeaturizer:
    """The train rows of ``curvature="fisher"`` (:mod:`trak_fast.scoring.fisher`) for one
    checkpoint: :meth:`compute` gives ``[G | S]`` ``[B, 2k]``, the log-likelihood gradients of
    the batch's own labels (columns ``:k``) and of labels drawn from the model (columns
    ``k:``; each example's draw is a function of the example and the checkpoint's seed, so a
    resumed or re-batched run draws the same), and ``Q = 1`` (the Fisher scores use none).
    Both in the feature space of ``settings``, with checkpoint ``model_id``'s projection.

    With the task's ``fisher_chunks = C > 1`` (the language-modeling task's default), ``S``
    has ``C`` rows per example side by side (``[G | S_1 | ... | S_C]``, ``(1 + C) k``
    columns): the sampled-label gradient of each chunk of the example's positions, so the
    Fisher is estimated from ``C n`` rows at the cost of one backward pass (the cross-chunk
    terms are dropped, as K-FAC drops cross-token ones)."""

    def __init__(self, model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], *,
                 task: Union[str, Task], settings: FeatureSettings, model_id: int = 0,
                 device: Optional[Device] = None, spec: Optional[FeatureSpec] = None,
                 optimizer_state: Any = None):
        self.task = get_task(task)
        if spec is None:      # the two likelihood tasks differentiate the same way: one spec
            spec = FeatureSpec(model, LogLikelihoodTask(self.task), settings)
        self.spec = spec

        def make(task_: Task, chunks: int = 1) -> Featurizer:
            return Featurizer(model, checkpoint, task=task_, settings=settings,
                              model_id=model_id, device=device, spec=spec,
                              position_chunks=chunks, optimizer_state=optimizer_state)
        self.loglik = make(LogLikelihoodTask(self.task))
        self.sampling = SampledLogLikelihoodTask(self.task, self.loglik.seed)
        self.chunks = fisher_chunks_of(self.task, spec)
        self.sampled = make(self.sampling, self.chunks)

    num_features = property(lambda self: (1 + self.chunks) * self.spec.num_features)
    layout = property(lambda self: self.spec.layout)       # of G's (and S's) k columns
    gradient_paths = property(lambda self: self.loglik.gradient_paths)
    moments = property(lambda self: self.loglik.moments)   # the second moments, or None

    def compute(self, batch: Batch, size: int, *, where: str = "batch",
                out_to_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``([G | S] [B, (1 + C) k], ones [B] or None)`` for one batch checked by the loop:
        ``G`` and ``S`` from one forward pass and two backward passes when every parameter
        takes the hooks, else from two featurizer passes."""
        q = torch.ones(size, dtype=torch.float32) if out_to_loss else None
        both = None
        if self.loglik.plan.hooked and not self.loglik.plan.vmapped and \
                not self.sampled.plan.vmapped:
            both = self._one_forward(batch, size, where)
        if both is None:
            g = self.loglik.compute(batch, size, where=where, out_to_loss=False)[0]
            s = self.sampled.compute(self.sampling.keyed(batch), size, out_to_loss=False,
                                     where=f"{where} (labels drawn from the model)")[0]
            both = torch.cat([g, s], dim=1)
        return both, q

    def _one_forward(self, batch: Batch, size: int, where: str) -> Optional[torch.Tensor]:
        """``[G | S]`` from one tapped forward pass; ``None`` when a tracked module did not see
        the batch (the two-pass route then moves it to vmap, as a featurizer does)."""
        g_rows, s_rows = self.loglik, self.sampled
        phi_g = torch.zeros(size, g_rows.num_features, dtype=g_rows.dtype, device=g_rows.device)
        phi_s = torch.zeros(size * self.chunks, s_rows.num_features, dtype=s_rows.dtype,
                            device=s_rows.device)
        taps = [g_rows._taps(phi_g, size), s_rows._taps(phi_s, size)]
        route = [0]          # which featurizer's callbacks the current backward pass feeds
        merged = [tap._replace(on_grad=lambda state, grad, i=i: taps[route[0]][i].on_grad(state, grad))
                  for i, tap in enumerate(taps[0])]          # the same P: one on_input for both
        keys = self.sampling.keyed(batch)[1]
        device_batch = to_device(batch, g_rows.device)
        draw = drawing(keys.to(g_rows.device))
        outputs = [lambda run: self.task.log_likelihoods(run, device_batch),
                   lambda run: self.task.log_likelihoods(run, device_batch, draw=draw)]
        with eval_mode(g_rows.model), naming_the_batch(where, batch):
            try:
                skipped = hooked_passes(merged, outputs, g_rows.run, size, g_rows.device,
                                        lambda i: route.__setitem__(0, i))
            except BaseException:
                g_rows.writer.discard()
                s_rows.writer.discard()
                raise
        if skipped:
            g_rows.writer.discard()
            s_rows.writer.discard()
            return None
        g_rows.writer.flush(phi_g)
        s_rows.writer.flush(phi_s)
        g_rows._log_paths()
        return torch.cat([phi_g, phi_s.reshape(size, -1)], dim=1)


def fisher_chunks_of(task: Task, spec: Optional[FeatureSpec] = None) -> int:
    """The task's ``fisher_chunks`` (an int >= 1; 1 when it has none), or 1 when ``spec``
    sends parameters to the vmap path, which has no chunks (logged)."""
    chunks = getattr(task, "fisher_chunks", 1)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"task {task.name!r}: fisher_chunks must be an int >= 1, got {chunks!r}")
    if chunks > 1 and spec is not None and spec.plan.vmapped:
        logger.info("curvature='fisher': one Fisher row per example, not %d: %s take the vmap "
                    "path, which has no chunks of positions", chunks, spec.plan.vmapped[:4])
        return 1
    return chunks
