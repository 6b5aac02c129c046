"""Data-parallel TRAK and attribute() over 2 gloo ranks on the CPU, against one process.

Each rank is a fresh ``python tests/distributed_worker.py`` with the environment torchrun sets
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); the single-process reference
runs the same worker in this process (one torch thread, as the workers). Runs that do not
depend on each other are started together: the cost is mostly starting Python and torch.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import distributed_worker

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch is built without torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode, store, out, world, **extra_env):
    """Starts WORLD ranks of the worker (a process group on a free port)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra_env)
        procs.append(subprocess.Popen([sys.executable, WORKER, mode, str(store), str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs, timeout=120):
    """[(returncode, output)] by rank; fails the test if a rank hangs."""
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {procs.index(proc)} of {len(procs)} hung:\n{proc.args}")
        results.append((proc.returncode, output))
    return results


def ok(results):
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank runs (started together, in the background) and the single-process
    reference (here): ``(reference folder, {mode: (folder, processes)})``."""
    single = tmp_path_factory.mktemp("single")
    distributed_worker.write_data(single)
    started = {}
    for mode in ("pipeline", "kill", "errors"):
        folder = tmp_path_factory.mktemp(mode)
        shutil.copy(single / "data.pt", folder / "data.pt")
        started[mode] = (folder, start(mode, folder / "store", folder, 2))
    # The control messages on the default gloo group, then on a gloo group of trak_fast's own.
    started["release"] = (None, start("release", "-", "-", 2))
    started["release_own_group"] = (None, start("release", "-", "-", 2,
                                                TRAK_FAST_DIST_TIMEOUT="60"))
    distributed_worker.run("pipeline", single / "store", single)
    return single, started


@pytest.fixture(scope="module")
def two_ranks(runs):
    folder, procs = runs[1]["pipeline"]
    ok(finish(procs))
    return folder


@pytest.fixture(scope="module")
def reference(runs):
    return runs[0]




def _features(store, model_id=0):
    folder = os.path.join(store, f"model_{model_id}")
    return [np.load(os.path.join(folder, name)) for name in
            ("features.npy", "out_to_loss.npy", "examples.npy", "finished.npy")]


def test_two_ranks_features_bitwise_and_scores_equal_single_process(reference, two_ranks):
    for model_id in (0, 1):
        ref, got = _features(reference / "store", model_id), _features(two_ranks / "store", model_id)
        assert got[3].all()
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)
    kernel_ref = [np.load(p) for p in sorted((reference / "store" / "model_0").glob("kernel_*"))]
    kernel_got = [np.load(p) for p in sorted((two_ranks / "store" / "model_0").glob("kernel_*"))]
    assert len(kernel_got) == len(kernel_ref) == 1
    np.testing.assert_allclose(kernel_got[0], kernel_ref[0], rtol=1e-12, atol=0)
    for target in ("val",):
        a = np.load(reference / "store" / f"experiment_{target}" / "targets_1.npy")
        b = np.load(two_ranks / "store" / f"experiment_{target}" / "targets_1.npy")
        np.testing.assert_array_equal(a, b)
    scores = np.load(reference / "scores_0.npy")
    assert np.abs(scores).max() > 0
    for rank in (0, 1):      # every rank returns the full scores
        got = np.load(two_ranks / f"scores_{rank}.npy")
        np.testing.assert_allclose(got, scores, rtol=1e-6, atol=1e-6 * np.abs(scores).max())


def test_two_ranks_dual_kernel_equals_single_process(reference, two_ranks):
    meta = json.loads((two_ranks / "store_raw" / "metadata.json").read_text())
    assert [k["form"] for k in meta["models"]["0"]["kernels"]["full/out_to_loss"]] == ["dual"]
    np.testing.assert_array_equal(np.load(two_ranks / "store_raw" / "model_0" / "features.npy"),
                                  np.load(reference / "store_raw" / "model_0" / "features.npy"))
    scores = np.load(reference / "raw_scores_0.npy")
    assert np.abs(scores).max() > 0
    for rank in (0, 1):
        got = np.load(two_ranks / f"raw_scores_{rank}.npy")
        np.testing.assert_allclose(got, scores, rtol=1e-6, atol=1e-6 * np.abs(scores).max())


def test_two_ranks_fisher_rows_bitwise_and_scores_equal_single_process(reference, two_ranks):
    ref, got = _features(reference / "store_fisher"), _features(two_ranks / "store_fisher")
    assert got[0].shape[1] == 2 * distributed_worker.PROJ_DIM and got[3].all()     # [G | S]
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    for name in ("fisher_scores", "fisher_attribute"):
        want = np.load(reference / f"{name}_0.npy")
        assert np.abs(want).max() > 0
        for rank in (0, 1):
            np.testing.assert_allclose(np.load(two_ranks / f"{name}_{rank}.npy"), want,
                                       rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_two_ranks_attribute_equals_single_process(reference, two_ranks):
    tau = np.load(reference / "attribute_0.npy")
    assert np.abs(tau).max() > 0
    for rank in (0, 1):
        got = np.load(two_ranks / f"attribute_{rank}.npy")
        np.testing.assert_allclose(got, tau, rtol=1e-6, atol=1e-6 * np.abs(tau).max())


def test_sigkill_of_one_rank_then_resume_with_two_or_one_ranks(runs, reference, tmp_path):
    folder, procs = runs[1]["kill"]
    store = folder / "store"
    results = finish(procs)
    assert results[1][0] == -9                       # rank 1 killed itself
    assert results[0][0] != 0                        # rank 0 failed instead of hanging
    assert "DistributedError" in results[0][1] and "featurize model_id 0" in results[0][1], \
        results[0][1][-2000:]
    assert "rank 1 of 2 did not answer" in results[0][1], results[0][1][-2000:]  # not an address
    finished = np.load(store / "model_0" / "finished.npy")
    assert 0 < finished.sum() < len(finished)        # some rows of both ranks, not all
    assert finished[10:20].all() and finished[30:40].all() and not finished[70:80].any()
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shutil.copy(folder / "data.pt", tmp_path / "data.pt")
    two, one = start("resume", store, folder, 2), start("resume", copy, tmp_path, 1)
    ok(finish(two))
    ok(finish(one))
    for resumed in (store, copy):
        for model_id in (0, 1):
            for a, b in zip(_features(reference / "store", model_id), _features(resumed, model_id)):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["release", "release_own_group"])
def test_collectives_return_only_after_gloo_let_go_of_their_tensors(runs, mode):
    """A gloo worker thread that drops a tensor Python has seen takes the GIL; if the
    interpreter is exiting by then the process aborts ("terminate called without an active
    exception") after a finished job. So when gather() / all_reduce_sum() return, none of the
    tensors they gave gloo may still be alive, and destroy_process_group() must free the groups
    (joining their threads) rather than trak_fast keeping them to the interpreter's exit."""
    results = finish(runs[1][mode][1])
    ok(results)      # every rank also ended with destroy_process_group() and a normal exit
    for rank, (_, output) in enumerate(results):
        lines = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
        assert lines["held after return"] == "0 of 610", output
        assert lines["groups alive after destroy_process_group"] == "0", output


def test_ranks_with_other_settings_or_unshared_store_raise(runs):
    folder, procs = runs[1]["errors"]
    results = finish(procs)
    ok(results)      # the worker prints the errors it caught
    for rank, (_, output) in enumerate(results):
        lines = dict(line.split(": ", 1) for line in output.splitlines()
                     if line.startswith(("mismatch: ", "unshared: ", "short: ")))
        assert lines["mismatch"].startswith("DistributedError") and \
            "disagree with rank 0" in lines["mismatch"] and "proj_dim" in lines["mismatch"], output
        expected = "DistributedError" if rank == 0 else "file system that every rank shares"
        assert expected in lines["unshared"], output
        assert lines["short"].startswith("ValueError: train yielded 110 examples") and \
            "not kept" in lines["short"], output
    finished = np.load(folder / "store" / "model_0" / "finished.npy")
    assert finished.sum() == 0       # both ranks' rows un-marked


def test_another_job_on_the_same_model_id_gets_store_busy(reference, tmp_path):
    """The ranks of one job share rank 0's model lock; a second job (here: this process
    holding the lock) makes the job fail on every rank, StoreBusyError on rank 0."""
    from trak_fast.pipeline.store import _flock
    shutil.copy(reference / "data.pt", tmp_path / "data.pt")
    store = tmp_path / "store"
    store.mkdir()
    with _flock(store / ".lock-model_0", blocking=False) as acquired:
        assert acquired
        results = finish(start("resume", store, tmp_path, 2))
    assert all(code != 0 for code, _ in results)
    assert "StoreBusyError" in results[0][1], results[0][1][-2000:]
    assert "DistributedError" in results[1][1] and "StoreBusyError" in results[1][1], \
        results[1][1][-2000:]
    assert not (store / "model_0" / "finished.npy").exists()
