"""Data-parallel TRAK under ``torch.distributed``: who does what, and errors instead of hangs.

Nothing here starts processes: the user launches every rank (``torchrun``) and initializes the
default process group; :class:`~trak_fast.TRAK` and :func:`~trak_fast.attribute` notice it
(:func:`active`) and split their work. Without a process group (or with one rank) every
function here is the identity and the single-process code runs unchanged.

Who does what, with ``W`` ranks:

- train and target batches: batch ``b`` of the loader is featurized by rank ``b % W``
  (:func:`owns`). Every rank iterates the whole loader (the same loader on every rank), so
  every rank counts the examples and knows each batch's first row; a rank only hashes,
  checks and computes its own batches, and writes only their rows;
- kernels: rank ``r`` accumulates ``Phi^T W Phi`` over the contiguous rows :func:`share`
  ``(n)`` in float64, and an ``all_reduce(SUM)`` adds the parts. A dual kernel (``k > n``,
  the full Gram matrix) is computed on rank 0 alone;
- scores: rank ``r`` computes the contiguous target columns :func:`share` ``(t)``;
- metadata and whole-file writes: rank 0 only, between steps.

Steps. Work is done in :func:`step` blocks: every rank runs the block, then all of them
exchange "ok" or their error's message (one ``all_gather_object``). If any rank failed, every
rank raises: the failing rank its own exception, the others :class:`DistributedError` naming
the rank and its message. So a rank never waits forever for another that failed, and no rank
goes on to read what a failed one did not write. A rank that died (SIGKILL, out of memory)
breaks the connection, which the survivors' next step reports as a :class:`DistributedError`.
No collective is ever issued inside a loop over batches, so ranks cannot get out of step.

The control messages go over a gloo group on the CPU (the default group itself when it is
gloo, otherwise one created on first use): NCCL jobs use the same code, and features and
scores are exchanged through CPU memory. Its timeout is ``TRAK_FAST_DIST_TIMEOUT`` seconds
(default: the default group's, ``init_process_group(timeout=...)``): a step waits at most that
long for the slowest rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None  # type: ignore[assignment]


class DistributedError(RuntimeError):
    """Another rank failed (or the ranks disagree); raised on every rank that did not fail itself."""


def active() -> bool:
    """A default process group with more than one rank is initialized."""
    return dist is not None and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def owns(batch_index: int) -> bool:
    """Whether this rank featurizes batch ``batch_index`` (the assignment ``b -> b % W``)."""
    return batch_index % world() == rank()


def share(count: int) -> Tuple[int, int]:
    """This rank's contiguous part ``[start, stop)`` of ``range(count)`` (sizes differ by <= 1)."""
    w, r = world(), rank()
    return r * count // w, (r + 1) * count // w


def local_device(device: torch.device, requested: Any) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA model when ``device`` was not given under a process group."""
    if active() and requested is None and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
    return device


_GROUPS: Dict[int, Any] = {}


def _group() -> Any:
    """The gloo group for control messages and CPU tensors (created once per default group)."""
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        seconds = os.environ.get("TRAK_FAST_DIST_TIMEOUT")
        timeout = None if seconds is None else datetime.timedelta(seconds=float(seconds))
        if dist.get_backend() == "gloo" and timeout is None:
            _GROUPS[key] = dist.group.WORLD
        else:
            _GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _GROUPS[key]


def gather(obj: Any, what: str = "exchanging data") -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world()
    try:
        dist.all_gather_object(out, obj, group=_group())
    except RuntimeError as exc:      # a peer died or timed out
        raise DistributedError(f"{what}: lost contact with the other ranks ({exc}); see the "
                               "other ranks' errors") from exc
    return out


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Runs the block on every rank; then raises on every rank if any rank failed in it."""
    if not active():
        yield
        return
    error: Optional[BaseException] = None
    try:
        yield
    except BaseException as exc:     # Ctrl-C too: the others must not wait for this rank
        error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    try:
        messages = gather(message, what)
    except DistributedError:
        if error is not None:
            raise error
        raise
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise DistributedError(f"{what}: " + "; ".join(f"rank {r} of {len(messages)} failed "
                                                        f"with {m}" for r, m in failed))


def agree(what: str, value: Any) -> None:
    """Raises on every rank unless every rank passed an equal ``value`` (e.g. its settings)."""
    if not active():
        return
    values = gather(value, what)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        detail = ""
        if isinstance(values[0], dict):
            keys = sorted({k for r in differ for k in set(values[0]) | set(values[r])
                           if values[0].get(k) != values[r].get(k)}, key=str)
            detail = " (" + ", ".join(f"{k}: rank 0 has {values[0].get(k)!r}, rank {r} has "
                                      f"{values[r].get(k)!r}" for r in differ for k in keys) + ")"
        raise DistributedError(f"{what}: rank(s) {differ} disagree with rank 0{detail}. Every "
                               "rank must run the same script with the same arguments and data.")


def broadcast(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    return gather(obj if is_main() else None, what)[0]


def all_reduce_sum(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (moved through the CPU), on ``tensor``'s device."""
    if not active():
        return tensor
    cpu = tensor.detach().cpu().contiguous()
    try:
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM, group=_group())
    except RuntimeError as exc:
        raise DistributedError(f"{what}: lost contact with the other ranks ({exc})") from exc
    return cpu.to(tensor.device)


def featurize_shares(featurizer: Any, batches: Iterable[Any], *, what: str, out_to_loss: bool,
                     before_batch: Optional[Callable[[str, int, Any], None]] = None,
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every rank's batches featurized by their owners and gathered: ``(phi, q)`` on every rank.

    ``before_batch(where, first_row, batch)`` (a fingerprint ledger) is called on every rank for
    every batch, so each rank checks all rows; only the featurizing is split. The rows are
    assembled in loader order, so the result is the single-process one bit for bit.
    """
    from ..features.loop import batches as checked_batches, no_batches
    parts: List[Tuple[int, np.ndarray, Optional[np.ndarray]]] = []
    with step(f"featurizing {what}"):
        seen = 0
        for item in checked_batches(batches, what, featurizer.task):
            seen += 1
            if before_batch is not None:
                before_batch(item.where, item.first_row, item.batch)
            if owns(item.index):
                phi, q = featurizer.compute(item.batch, item.size, where=item.where,
                                            out_to_loss=out_to_loss)
                parts.append((item.index, phi.cpu().numpy(), None if q is None else q.cpu().numpy()))
        if seen == 0:
            raise no_batches(what)
    everything = sorted((p for rank_parts in gather(parts, f"gathering the {what} features")
                         for p in rank_parts), key=lambda p: p[0])
    phi = torch.from_numpy(np.concatenate([p[1] for p in everything]))
    q = torch.from_numpy(np.concatenate([p[2] for p in everything])) if out_to_loss else None
    return phi, q


def reduced_kernels(features: Any, blocks: Sequence[Any], *, weights: Optional[torch.Tensor],
                    device: Any, where: str) -> Optional[List[Tuple[Any, Any]]]:
    """``compute_kernels(features, blocks, weights=weights)`` with the rows split over ranks.

    Primal blocks: each rank's float64 ``Phi_r^T W_r Phi_r`` over its :func:`share` of the rows,
    summed with ``all_reduce``. Dual blocks (more columns than rows) are computed on rank 0.
    Returns the kernels on rank 0, ``None`` on the others. Call it on every rank.
    """
    from ..scoring.kernel import Kernel, compute_kernel, kernel_matrix, nonzero_kernels
    n = features.shape[0]
    start, stop = share(n)
    part_weights = None if weights is None else weights[start:stop]
    kernels = []
    with step(f"{where}: computing the kernel"):
        for block in blocks:
            columns = features[:, block.start:block.stop]
            if block.stop - block.start > n:
                kernels.append(compute_kernel(columns, form="dual", device=device, weights=weights)
                               if is_main() else None)
            else:
                part = kernel_matrix(columns[start:stop], device=device, weights=part_weights)
                kernels.append(part)
    out = []
    for block, kernel in zip(blocks, kernels):
        if isinstance(kernel, torch.Tensor):
            kernel = Kernel(all_reduce_sum(kernel, f"{where}: summing the kernel"), "primal", n,
                            weights)
        out.append((block, kernel))
    return nonzero_kernels(out, where) if is_main() else None
