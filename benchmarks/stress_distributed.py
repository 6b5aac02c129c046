"""Stress: does a finished 2-rank gloo TRAK job exit 0 every time (issue 26, item 4)?

Runs a small TRAK job (featurize 2 models, finalize, featurize_targets, score) as a new user
would: ``torchrun --standalone --nproc_per_node 2`` (or ``--launcher env``: two plain Python
processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), ending with
``dist.destroy_process_group()`` (``--end destroy``) or with nothing at all (``--end none``)
and a normal interpreter exit. Two kinds of runs:

- fresh: a new store, the whole job;
- resumed: a job whose rank 1 SIGKILLs itself in the middle of featurizing model 0 (this run
  is expected to fail), then the whole job again on that store; the rerun is counted.

A counted run is bad if its exit status is not 0, if its output contains ``terminate called``
(the gloo abort at interpreter exit), or if the scores it wrote differ from the single-process
scores of the same job. Prints a table and writes ``benchmarks/results/stress_distributed.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/stress_distributed.py --fresh 100 --resumed 100

This is a stress script, not a test: an abort is a race with the interpreter's exit, so the
counts depend on the machine's load (reported in the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_TRAIN, N_TARGETS, BATCH, PROJ_DIM, HIDDEN = 120, 10, 10, 32, 16


# ---- one rank of the job ------------------------------------------------------------------

def job(mode: str, store: str, end: str) -> None:
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist

    from trak_fast import TRAK, digits

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(0)
    x, xt = torch.rand(N_TRAIN, 64, generator=generator), torch.rand(N_TARGETS, 64, generator=generator)
    y = torch.randint(0, 10, (N_TRAIN,), generator=generator)
    yt = torch.randint(0, 10, (N_TARGETS,), generator=generator)
    model = digits.make_mlp(HIDDEN, seed=0)
    checkpoints = [digits.make_mlp(HIDDEN, seed=s).state_dict() for s in (0, 1)]
    train, targets = digits.batches(x, y, BATCH), digits.batches(xt, yt, 3)

    trak = TRAK(store, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, progress=False)
    if mode == "kill":
        def dying():
            for index, batch in enumerate(train):
                if rank == 1 and index == 7:      # after its batches 1, 3, 5 were written
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch
        trak.featurize(checkpoints[0], dying(), model_id=0)
        return
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train, model_id=model_id)
    trak.finalize()
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("val", checkpoint, targets, model_id=model_id)
    scores = trak.score("val")
    if rank == 0:
        np.save(os.path.join(store, "..", "scores.npy"), np.asarray(scores))
    if distributed and end == "destroy":
        dist.destroy_process_group()
    # ... and the interpreter exits normally: that exit is what is being tested.


# ---- the driver ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, store: str, args, timeout: float):
    """Runs the job on 2 ranks: ``(exit status, output)``; the status is torchrun's, or with
    ``--launcher env`` the first nonzero status of the two ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    me = [os.path.abspath(__file__), "--job", mode, store, "--end", args.end]
    if args.launcher == "torchrun":
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--standalone", "--nproc_per_node", "2"] + me
        try:
            proc = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return "timeout", (exc.output or "") if isinstance(exc.output, str) else ""
        return proc.returncode, proc.stdout
    port = _free_port()
    procs = [subprocess.Popen([sys.executable] + me, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    codes, output = [], ""
    deadline = time.time() + timeout
    for r, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return "timeout", output
        codes.append(proc.returncode)
        output += f"---- rank {r}: exit {proc.returncode}\n{out}"
    bad = [c for c in codes if c != 0]
    if mode == "kill":                # rank 1 killed itself: rank 0's status is what counts
        return codes[0], output
    return (bad[0] if bad else 0), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", type=int, default=100, help="fresh runs")
    parser.add_argument("--resumed", type=int, default=100, help="runs resumed after a SIGKILL")
    parser.add_argument("--launcher", choices=("torchrun", "env"), default="torchrun")
    parser.add_argument("--end", choices=("destroy", "none"), default="destroy",
                        help="the job ends with dist.destroy_process_group() or with nothing")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    parser.add_argument("--label", default="", help="recorded in the JSON (e.g. before/after)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "stress_distributed.json"))
    parser.add_argument("--job", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.job[0], args.job[1], args.end)
        return 0

    import numpy as np
    work = tempfile.mkdtemp(prefix="stress_distributed_")
    reference = os.path.join(work, "reference")
    os.makedirs(reference)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--job", "full",
                    os.path.join(reference, "store")], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1",
                            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    expected = np.load(os.path.join(reference, "scores.npy"))
    rows = {kind: {"runs": 0, "nonzero_exit": 0, "terminate_called": 0, "wrong_scores": 0,
                   "kill_runs_exit_0": 0, "seconds": 0.0} for kind in ("fresh", "resumed")}
    failures = []
    plan = [kind for i in range(max(args.fresh, args.resumed))         # interleaved
            for kind, count in (("fresh", args.fresh), ("resumed", args.resumed)) if i < count]
    started, interrupted = time.time(), False
    try:
        run_all(plan, work, args, expected, rows, failures, started)
    except KeyboardInterrupt:     # Ctrl-C: the runs so far are still reported
        interrupted = True
    shutil.rmtree(work, ignore_errors=True)
    report(args, rows, failures, started, interrupted)
    return 1 if failures else 0


def run_all(plan, work, args, expected, rows, failures, started) -> None:
    import numpy as np
    for i, kind in enumerate(plan):
        folder = os.path.join(work, f"run_{i}")
        os.makedirs(folder)
        store = os.path.join(folder, "store")
        t0 = time.time()
        if kind == "resumed":
            code, _ = launch("kill", store, args, args.timeout)
            rows[kind]["kill_runs_exit_0"] += code == 0
        code, output = launch("full", store, args, args.timeout)
        row = rows[kind]
        row["runs"] += 1
        row["seconds"] += time.time() - t0
        terminated = "terminate called" in output
        scores = os.path.join(folder, "scores.npy")
        wrong = not os.path.exists(scores) or not np.allclose(
            np.load(scores), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        row["nonzero_exit"] += code != 0
        row["terminate_called"] += terminated
        row["wrong_scores"] += wrong
        if code != 0 or terminated or wrong:
            failures.append({"run": i, "kind": kind, "exit": code, "terminate_called": terminated,
                             "wrong_scores": wrong, "output_tail": output[-3000:]})
            print(f"run {i} ({kind}): exit {code}, terminate called: {terminated}, "
                  f"wrong scores: {wrong}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{len(plan)} runs, {len(failures)} bad, "
                  f"{time.time() - started:.0f} s", flush=True)


def report(args, rows, failures, started, interrupted) -> None:
    print(f"\n{'runs':<9}{'count':>7}{'exit!=0':>9}{'terminate':>11}{'wrong':>7}{'s/run':>8}")
    for kind, row in rows.items():
        if row["runs"]:
            print(f"{kind:<9}{row['runs']:>7}{row['nonzero_exit']:>9}{row['terminate_called']:>11}"
                  f"{row['wrong_scores']:>7}{row['seconds'] / row['runs']:>8.1f}")
    import torch
    result = {"label": args.label, "launcher": args.launcher, "end": args.end,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
              "wall_seconds": round(time.time() - started, 1), "interrupted": interrupted,
              "rows": rows, "failures": failures}
    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.append(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
