"""Features: projected per-example gradients of the task's model output, one checkpoint at a time.

For checkpoint ``m`` with parameters ``theta_m`` and train example ``z``::

    phi_m(z) = P_m^T grad_theta f(z; theta_m)        # [k], P_m = R_m / sqrt(k)
    Q_m(z)   = -d loss / d f  at z                   # out-to-loss weight

``grad_theta f`` comes from ``torch.func``: ``vmap`` over ``grad`` of a ``functional_call``
that runs the caller's module with the checkpoint's tensors. The module is never modified
(its train/eval flags are switched to eval for the call and restored). The per-parameter
gradients go to :func:`trak_fast.project` as a list, so no ``[B, p]`` copy is ever made;
``P_m`` is the matrix of seed ``model_seed(seed, m)``.

Memory: per-example gradients of a group of parameters take ``B x p_group`` elements. When
``B x p`` exceeds ``grad_memory`` bytes, the parameters are split into consecutive groups
(each its own forward/backward pass, projected into the same output with its
``feature_offset``), and a group larger than the budget on its own is run on slices of the
batch. Parameters outside ``grad_wrt`` are passed as constants, so their gradients are never
computed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .projection import model_seed, project
from .tasks import Task, get_task

Batch = Any
Device = Union[str, torch.device]

#: Bytes one group of per-example gradients (``B x p_group`` elements) may take.
DEFAULT_GRAD_MEMORY = 1 << 30


class Features(NamedTuple):
    """One checkpoint's train features: ``phi [n, k]`` and out-to-loss weights ``out_to_loss [n]``."""

    phi: torch.Tensor
    out_to_loss: Optional[torch.Tensor]


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


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, batch)


def _groups(sizes: Sequence[int], max_elements: int) -> List[List[int]]:
    """Consecutive parameter groups whose total size is at most ``max_elements`` (>= 1 each)."""
    groups: List[List[int]] = []
    current: List[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and total + size > max_elements:
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups


class Featurizer:
    """Computes ``(phi [B, k], Q [B])`` for batches under one checkpoint.

    Args:
        model: the module whose forward defines the model; never modified.
        checkpoint: its state_dict (parameters and persistent buffers).
        task: a :class:`~trak_fast.Task` or a built-in task name.
        proj_dim: ``k``; ``None`` keeps the raw gradients (``k = p``, parameter order).
        kind, seed, model_id: the projection matrix ``P_m``, seed ``model_seed(seed, model_id)``.
        nnz: nonzeros per row for ``kind="sparse"``.
        grad_wrt: names of the parameters to differentiate (``None``: all), in model order.
        device: where gradients are computed (``None``: the model's parameter device).
        grad_memory: bytes one group of per-example gradients may take.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], *,
                 task: Union[str, Task] = "classification", proj_dim: Optional[int] = 2048,
                 kind: str = "rademacher", seed: int = 0, model_id: int = 0,
                 grad_wrt: Optional[Sequence[str]] = None, device: Optional[Device] = None,
                 grad_memory: int = DEFAULT_GRAD_MEMORY, nnz: int = 4):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_proj_dim(proj_dim)
        _check_grad_memory(grad_memory)
        self.model = model
        self.task = get_task(task)
        self.proj_dim = proj_dim
        self.kind = kind
        self.nnz = nnz
        self.seed = model_seed(seed, model_id)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.grad_memory = grad_memory
        self.params, self.buffers = checkpoint_tensors(model, checkpoint, self.device,
                                                       where=f"checkpoint {model_id}")
        self.grad_names = grad_param_names(model, grad_wrt)
        self.grad_sizes = [self.params[n].numel() for n in self.grad_names]
        self.offsets = [0]
        for size in self.grad_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.num_grad_params = self.offsets[-1]
        self.num_features = proj_dim if proj_dim is not None else self.num_grad_params
        self.dtype = (torch.float64 if any(self.params[n].dtype == torch.float64
                                           for n in self.grad_names) else torch.float32)
        if proj_dim is not None:
            project([torch.zeros(1, 1)], proj_dim, seed=self.seed, kind=kind, nnz=nnz)  # validates kind, nnz

    def _model_fn(self, params: Mapping[str, torch.Tensor]):
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.func.functional_call(self.model, (params, self.buffers), args, kwargs)
        return run

    def out_to_loss(self, batch: Batch) -> torch.Tensor:
        """``Q [B]`` (float32) from one batched forward pass with the checkpoint."""
        with torch.no_grad():
            q = self.task.out_to_loss(self._model_fn(self.params), batch)
        return q.detach().reshape(-1).float()

    def _grads(self, group: List[str], batch: Batch) -> Dict[str, torch.Tensor]:
        """Per-example gradients ``{name: [B, *shape]}`` of ``f`` w.r.t. the group only."""
        frozen = {n: t for n, t in self.params.items() if n not in group}
        task = self.task

        def output(wrt: Dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
            return task.output(self._model_fn({**frozen, **wrt}), example)

        wrt = {n: self.params[n] for n in group}
        return torch.func.vmap(torch.func.grad(output), in_dims=(None, 0), randomness="error")(wrt, batch)

    def features(self, batch: Batch, batch_size: int) -> torch.Tensor:
        """``phi [B, k]``: the projected (or raw) per-example gradients of one batch."""
        phi = torch.zeros(batch_size, self.num_features, dtype=self.dtype, device=self.device)
        element_bytes = 8 if self.dtype == torch.float64 else 4
        budget = max(1, self.grad_memory // element_bytes)
        for group in _groups(self.grad_sizes, max(1, budget // batch_size)):
            names = [self.grad_names[i] for i in group]
            offset = self.offsets[group[0]]
            rows = max(1, min(batch_size, budget // sum(self.grad_sizes[i] for i in group)))
            for start in range(0, batch_size, rows):
                stop = min(batch_size, start + rows)
                part = batch if (start, stop) == (0, batch_size) else _slice(batch, start, stop)
                grads = self._grads(names, part)
                pieces = [_dense(grads[n].detach()) for n in names]
                if self.proj_dim is None:
                    column = offset
                    for piece in pieces:
                        width = piece[0].numel()
                        phi[start:stop, column:column + width] = piece.reshape(stop - start, width)
                        column += width
                else:
                    project(pieces, self.proj_dim, seed=self.seed, kind=self.kind, nnz=self.nnz,
                            feature_offset=offset, out=phi[start:stop])
        return phi

    def __call__(self, batch: Batch, *, where: str = "batch",
                 out_to_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(phi [B, k], Q [B] or None)`` for one batch, after validating it."""
        size = self.task.check_batch(batch, where)
        if size == 0:
            raise ValueError(f"{where} is empty (batch size 0)")
        batch = to_device(batch, self.device)
        with eval_mode(self.model):
            try:
                # Q is computed even when not wanted: its batched forward pass is cheap and
                # lets the task validate the batch against the model (e.g. label range).
                q = self.out_to_loss(batch)
                phi = self.features(batch, size)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from exc
            except RuntimeError as exc:
                raise RuntimeError(f"{where}: the model or task failed on this batch "
                                   f"(shapes {_shapes(batch)}): {exc}") from exc
        if q.shape != (size,):
            raise ValueError(f"{where}: task.out_to_loss must return shape [{size}], got "
                             f"{tuple(q.shape)}")
        return phi, (q if out_to_loss else None)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with its own memory for every element.

    ``torch.func.grad`` returns the gradient of a parameter the output does not depend on (one
    outside the forward, or behind a ``detach``) as zeros expanded with stride 0. Such a tensor
    overlaps itself, and ``project`` refuses inputs whose overlap with ``out`` it cannot rule
    out; the copy is no larger than an ordinary gradient. The all-zero features that result
    are then reported by :func:`trak_fast.kernel.check_kernel`.
    """
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return grad.contiguous()
    return grad


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
              progress: bool = False, out_to_loss: bool = True, what: str = "train",
              nnz: int = 4) -> Features:
    """Features of every example in ``batches`` under one checkpoint, in memory.

    Returns ``Features(phi [n, k], out_to_loss [n])`` on the CPU: ``phi`` float32 (float64 for
    a float64 model), ``phi[i] = P_m^T grad f(z_i)`` with ``P_m`` scaled by ``1/sqrt(k)`` so
    that ``E ||phi_i||^2 = ||grad f(z_i)||^2``; raw gradients when ``proj_dim=None``.
    ``out_to_loss`` is ``None`` when not requested. A gradient dot product baseline is
    ``featurize(...).phi @ target_features(...).T``.
    """
    featurizer = Featurizer(model, checkpoint, task=task, proj_dim=proj_dim, kind=kind, seed=seed,
                            model_id=model_id, grad_wrt=grad_wrt, device=device,
                            grad_memory=grad_memory, nnz=nnz)
    phis: List[torch.Tensor] = []
    qs: List[torch.Tensor] = []
    shapes = None
    for index, batch in enumerate(_batches(batches, what, progress, _loader_length(batches))):
        where = f"{what} batch {index}"
        if featurizer.task.fixed_shapes:
            shapes = _check_same_shapes(batch, shapes, where)
        phi, q = featurizer(batch, where=where, out_to_loss=out_to_loss)
        phis.append(phi.cpu())
        if q is not None:
            qs.append(q.cpu())
    if not phis:
        raise ValueError(f"{what} yielded no batches: expected an iterable of batches "
                         "(a list or a DataLoader that can be iterated again for every checkpoint)")
    return Features(torch.cat(phis), torch.cat(qs) if out_to_loss else None)


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
