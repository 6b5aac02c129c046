"""One rank of the tests in test_distributed.py (launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment; WORLD_SIZE=1 runs without a process group).

    python distributed_worker.py MODE STORE OUT

MODE: "pipeline" (TRAK featurize, finalize, targets, score, then attribute), "kill" (rank 1
SIGKILLs itself in the middle of featurize), "resume" (featurize only), "mismatch" (rank 1
passes another proj_dim), "unshared" (each rank gets its own store directory).
"""
import datetime
import os
import signal
import sys

import numpy as np
import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from trak_fast import TRAK, attribute, digits  # noqa: E402

N_TRAIN, N_TARGETS, BATCH, PROJ_DIM, HIDDEN = 120, 10, 10, 32, 16


def problem():
    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    model = digits.make_mlp(HIDDEN, seed=0)
    checkpoints = [digits.make_mlp(HIDDEN, seed=s).state_dict() for s in (0, 1)]
    return model, checkpoints, digits.batches(x, y, BATCH), digits.batches(xt, yt, 3)


def main():
    mode, store, out = sys.argv[1], sys.argv[2], sys.argv[3]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    model, checkpoints, train, targets = problem()
    proj_dim = PROJ_DIM + (8 if mode == "mismatch" and rank == 1 else 0)
    if mode == "unshared":
        store = f"{store}_{rank}"
    trak = TRAK(store, model, train_size=N_TRAIN, proj_dim=proj_dim, progress=False)
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
    tau = attribute(model, checkpoints, train, targets, proj_dim=PROJ_DIM, progress=False)
    np.save(os.path.join(out, f"attribute_{rank}.npy"), tau.numpy())
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
