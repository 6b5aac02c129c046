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
exchange "ok" or their error's message (one :func:`gather`). If any rank failed, every
rank raises: the failing rank its own exception, the others :class:`DistributedError` naming
the rank and its message. So a rank never waits forever for another that failed, and no rank
goes on to read what a failed one did not write. A rank that died (SIGKILL, out of memory)
breaks the connection, which the survivors' next step reports as a :class:`DistributedError`
naming the ranks that did not answer a roll call in the rendezvous store.
No collective is ever issued inside a loop over batches, so ranks cannot get out of step.

The control messages go over a gloo group on the CPU (the default group itself when it is
gloo, otherwise one created on first use): NCCL jobs use the same code, and features and
scores are exchanged through CPU memory. Its timeout is ``TRAK_FAST_DIST_TIMEOUT`` seconds
(default: the default group's, ``init_process_group(timeout=...)``): a step waits at most that
long for the slowest rank.

Exiting. A gloo worker thread drops a collective's tensors some time after the collective
completed; a tensor that Python has seen needs the GIL for that, and a thread that asks for the
GIL while the interpreter is finalizing kills the process (``terminate called without an active
exception``, exit 1, after the job's work was done). So every collective here runs on tensors
this module owns, and returns only once gloo has let go of all of them (:func:`_collective`);
and no process group is kept alive here (``destroy_process_group`` really destroys it, joining
its threads).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

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


# (weak reference to the default group, weak reference to the gloo group made for it): no
# strong reference, so that destroy_process_group() frees the groups and joins their threads.
_GROUP: Tuple[Any, Any] = (lambda: None, lambda: None)


def _group() -> Any:
    """The gloo group for control messages and CPU tensors (created once per default group)."""
    global _GROUP
    world_group = dist.group.WORLD
    seconds = os.environ.get("TRAK_FAST_DIST_TIMEOUT")
    if dist.get_backend() == "gloo" and seconds is None:
        return world_group
    made_for, group = _GROUP[0](), _GROUP[1]()
    if made_for is not world_group or group is None:
        timeout = None if seconds is None else datetime.timedelta(seconds=float(seconds))
        group = dist.new_group(backend="gloo", timeout=timeout)
        _GROUP = (weakref.ref(world_group), weakref.ref(group))
    return group


# How long a collective waits, after it completed, for gloo to drop its tensors (once that
# wait ran out, no later collective waits: this torch keeps them for some other reason).
_RELEASE_SECONDS = 30.0
_RELEASE_WAIT = True


def _collective(function: Callable[..., Any], tensors: Sequence[torch.Tensor], what: str,
                *args: Any, **kwargs: Any) -> None:
    """``function(*args, group=..., **kwargs)`` (a blocking ``torch.distributed`` collective on
    ``tensors``), returning only once gloo's worker thread has dropped its references to them.

    The worker thread releases a finished collective after the caller has been woken. A tensor
    Python has seen holds one reference to its Python object for as long as C++ holds it, so
    releasing it takes the GIL, and a thread that takes the GIL while the interpreter exits is
    killed, which aborts the process. Waiting here (the GIL released) until every tensor's
    Python reference count is back where it was means that gloo holds nothing of ours once the
    collective returns, whatever the caller does next (including exiting at once). With a torch
    whose C++ references do not show in the Python count, the wait ends at once. A failed
    collective raises without waiting (its traceback holds references to the tensors).
    """
    global _CALLS, _RELEASE_WAIT
    _CALLS += 1
    before = _references(tensors)
    try:
        function(*args, group=_group(), **kwargs)
    except RuntimeError as exc:      # a peer died or timed out
        raise DistributedError(f"{what}: lost contact with the other ranks: {_roll_call()} "
                               f"(gloo: {exc}); see the other ranks' errors") from exc
    deadline, pause = time.monotonic() + _RELEASE_SECONDS, 1e-4
    while _RELEASE_WAIT and _references(tensors) != before:
        if time.monotonic() > deadline:
            _RELEASE_WAIT = False
            warnings.warn(f"{what}: torch.distributed still holds the tensors of a collective "
                          f"{_RELEASE_SECONDS:g} s after it completed; trak_fast no longer waits "
                          "for their release (an exit right after a collective may abort)")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)


# Collectives issued so far (the same count on every rank: they all issue the same ones).
_CALLS = 0
# How long a rank whose collective failed waits for the others to answer the roll call.
_ROLL_CALL_SECONDS = 5.0


def _roll_call() -> str:
    """Which ranks are gone, after a failed collective: every rank that got as far writes its
    rank under a key for this collective in the rendezvous store; the ranks whose key does not
    appear within ``_ROLL_CALL_SECONDS`` are named (gloo's error names only an address)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"trak_fast/roll_call/{_CALLS}/"
        store.set(key + str(rank()), "here")
        deadline = time.monotonic() + _ROLL_CALL_SECONDS
        while True:
            missing = [r for r in range(world()) if r != rank() and not store.check([key + str(r)])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception as exc:   # noqa: BLE001 - the store's host (rank 0 without torchrun) died
        return (f"rank {rank()} cannot reach the rendezvous store either ({type(exc).__name__}: "
                f"{exc}), so the rank that hosts it (rank 0 when started without torchrun) "
                "probably died")
    if not missing:
        return f"every rank of {world()} answered the roll call (a connection failed)"
    listed = ", ".join(str(r) for r in missing)
    return (f"rank{'s' if len(missing) > 1 else ''} {listed} of {world()} did not answer within "
            f"{_ROLL_CALL_SECONDS:g} s (died, or still busy)")


def _references(tensors: Sequence[torch.Tensor]) -> List[int]:
    return [sys.getrefcount(t) for t in tensors]


def gather(obj: Any, what: str = "exchanging data") -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group)."""
    if not active():
        return [obj]
    # all_gather_object, on tensors made and held here (see _collective): the pickled sizes,
    # then the pickles padded to the longest.
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world())]
    _collective(dist.all_gather, sizes + [size], what, sizes, size)
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine.numpy()[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    del payload
    everyone = [torch.empty(longest, dtype=torch.uint8) for _ in range(world())]
    _collective(dist.all_gather, everyone + [mine], what, everyone, mine)
    return [pickle.loads(memoryview(t.numpy())[:int(s)]) for t, s in zip(everyone, sizes)]


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
    _collective(dist.all_reduce, [cpu], what, cpu, op=dist.ReduceOp.SUM)
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
