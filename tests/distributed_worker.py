"""One rank of the tests in test_distributed.py (launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment; WORLD_SIZE=1 runs without a process group).

    python distributed_worker.py MODE STORE OUT

MODE: "pipeline" (TRAK featurize, finalize, targets, score, then attribute), "kill" (rank 1
SIGKILLs itself in the middle of featurize), "resume" (featurize only), "errors" (rank 1
passes another proj_dim, then each rank gets its own store directory, then a loader one
batch short of train_size: all must raise), "release" (trak_fast's collectives, recording the
tensors given to gloo: does gloo still hold any when they return? are the groups freed by
destroy_process_group?).
Every mode ends as a user's script would: destroy_process_group(), then a normal exit.
The digits split is read from OUT/data.pt (written by the test: no scikit-learn import here).
"""
import datetime
import gc
import os
import signal
import sys
import weakref

import numpy as np
import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from trak_fast import TRAK, attribute  # noqa: E402
from trak_fast.eval import digits  # noqa: E402
from trak_fast.pipeline import distributed  # noqa: E402
from trak_fast.pipeline.distributed import DistributedError  # noqa: E402

N_TRAIN, N_TARGETS, BATCH, PROJ_DIM, HIDDEN = 120, 10, 10, 32, 16


def problem(out):
    x, y, xt, yt = torch.load(os.path.join(out, "data.pt"))
    model = digits.make_mlp(HIDDEN, seed=0)
    checkpoints = [digits.make_mlp(HIDDEN, seed=s).state_dict() for s in (0, 1)]
    return model, checkpoints, digits.batches(x, y, BATCH), digits.batches(xt, yt, 3)


def write_data(out):
    torch.save(digits.load_digits(N_TRAIN, N_TARGETS), os.path.join(out, "data.pt"))


def release(rank, world):
    """Prints how many of the tensors trak_fast's collectives gave gloo were still alive when
    gather() / all_reduce_sum() returned (trak_fast drops its own: only gloo's worker thread can
    hold them then), and whether destroy_process_group() freed the process groups."""
    seen = []      # weak references: the count of references gloo's release is waited on

    def recording(real):
        def collective(*args, **kwargs):
            for arg in args:
                seen.extend(weakref.ref(t) for t in (arg if isinstance(arg, list) else [arg]))
            return real(*args, **kwargs)
        return collective

    module = dist.distributed_c10d      # all_gather_object calls this module's all_gather
    for name in ("all_gather", "all_reduce"):
        wrapped = recording(getattr(module, name))
        setattr(module, name, wrapped)
        setattr(dist, name, wrapped)
    held = given = 0
    for i in range(100):
        obj = (rank, i, "x" * (i * rank))
        assert distributed.gather(obj, "test") == [(r, i, "x" * (i * r)) for r in range(world)]
        if i % 10 == 0:
            summed = distributed.all_reduce_sum(torch.full((3,), float(rank + 1)), "test")
            assert summed.tolist() == [world * (world + 1) / 2] * 3, summed
            del summed     # the tensor given to gloo (on the CPU, all_reduce_sum returns it)
        held += sum(t() is not None for t in seen)
        given += len(seen)
        seen.clear()
    print(f"held after return: {held} of {given}", flush=True)
    groups = [weakref.ref(dist.group.WORLD), weakref.ref(distributed._group())]
    dist.destroy_process_group()
    gc.collect()
    print(f"groups alive after destroy_process_group: {sum(g() is not None for g in groups)}",
          flush=True)


def run(mode, store, out, rank=0, world=1):
    if mode == "release":
        return release(rank, world)
    model, checkpoints, train, targets = problem(out)
    if mode == "errors":
        for what, proj_dim, where in (("mismatch", PROJ_DIM + 8 * rank, store),
                                      ("unshared", PROJ_DIM, f"{store}_{rank}")):
            try:
                TRAK(where, model, train_size=N_TRAIN, proj_dim=proj_dim, progress=False)
            except (DistributedError, ValueError) as exc:
                print(f"{what}: {type(exc).__name__}: {exc}", flush=True)
        trak = TRAK(store, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, progress=False)
        try:        # one batch short: every rank counts the rows and un-marks its own
            trak.featurize(checkpoints[0], (b for b in train[:-1]), model_id=0)
        except ValueError as exc:
            print(f"short: {type(exc).__name__}: {exc}", flush=True)
        return
    trak = TRAK(store, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, progress=False)
    if mode == "kill":
        def dying():
            for index, batch in enumerate(train):
                if rank == 1 and index == 7:      # after its batches 1, 3, 5 were written
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch
        trak.featurize(checkpoints[0], list(dying()) if rank == 0 else dying(), model_id=0)
        return
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train, model_id=model_id)
    if mode == "resume":
        return
    trak.finalize()
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("val", checkpoint, targets, model_id=model_id)
    np.save(os.path.join(out, f"scores_{rank}.npy"), np.array(trak.score("val")))
    # Raw gradients (1210 features > 120 rows): the dual kernel, computed on rank 0 alone.
    raw = TRAK(f"{store}_raw", model, train_size=N_TRAIN, proj_dim=None, progress=False)
    raw.featurize(checkpoints[0], train, model_id=0)
    raw.finalize()
    raw.featurize_targets("val", checkpoints[0], targets, model_id=0)
    np.save(os.path.join(out, f"raw_scores_{rank}.npy"), np.array(raw.score("val")))
    tau = attribute(model, checkpoints, train, targets, proj_dim=PROJ_DIM, progress=False)
    np.save(os.path.join(out, f"attribute_{rank}.npy"), tau.numpy())
    # The Fisher: [G | S] rows in the store, and attribute()'s in-memory form.
    fisher = TRAK(f"{store}_fisher", model, train_size=N_TRAIN, proj_dim=PROJ_DIM,
                  curvature="fisher", progress=False)
    fisher.featurize(checkpoints[1], train, model_id=0)
    fisher.featurize_targets("val", checkpoints[1], targets, model_id=0)
    np.save(os.path.join(out, f"fisher_scores_{rank}.npy"), np.array(fisher.score("val")))
    tau = attribute(model, checkpoints, train, targets, proj_dim=PROJ_DIM, curvature="fisher",
                    progress=False)
    np.save(os.path.join(out, f"fisher_attribute_{rank}.npy"), tau.numpy())


if __name__ == "__main__":
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    run(sys.argv[1], sys.argv[2], sys.argv[3], rank, world)
    if dist.is_initialized():
        dist.destroy_process_group()
