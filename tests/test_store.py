"""The store: kill and resume bitwise, mismatched reopen, versioning, the TRAK class end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute
from torch import nn

from trak_fast.pipeline.store import STORE_FORMAT_VERSION, StoreBusyError, StoreMismatchError
from trak_fast.features.tasks import ClassificationTask
from trak_fast.pipeline.trak import TRAK
from trak_fast.pipeline.train_rows import write_train_features

N_TRAIN, N_TARGETS, BATCH = 200, 8, 10
PROJ_DIM = 64
# trak_fast.project itself is bitwise identical for any number of threads, but the raw
# per-example gradients that featurize feeds it come from torch's own matmuls, whose last bits
# differ between 1 and 2 threads. So both processes run with one thread: bitwise resume holds
# for the same loader, device and torch thread count.
THREADS = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    checkpoints = []
    for seed in range(2):
        model = digits.make_mlp(16, seed=seed)
        digits.train(model, x, y, epochs=3, seed=seed)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    folder = tmp_path_factory.mktemp("inputs")
    torch.save({"checkpoint": checkpoints[0], "checkpoints": checkpoints, "x": x, "y": y},
               folder / "inputs.pt")
    return model, checkpoints, (x, y, xt, yt), folder / "inputs.pt"


class CountingTask(ClassificationTask):
    """Counts batches actually computed (one out_to_loss call each)."""

    def __init__(self):
        self.calls = 0

    def out_to_loss(self, model, batch):
        self.calls += 1
        return super().out_to_loss(model, batch)


CHILD = r"""
import sys, time, torch
torch.set_num_threads(%d)
from trak_fast.eval import digits
from trak_fast.pipeline.trak import TRAK
inputs = torch.load(sys.argv[2])
x, y = inputs["x"], inputs["y"]
def slow_batches():
    for batch in digits.batches(x, y, %d):
        time.sleep(0.15)
        yield batch
trak = TRAK(sys.argv[1], digits.make_mlp(16), train_size=len(x), proj_dim=%d, progress=False)
trak.featurize(inputs["checkpoint"], slow_batches(), model_id=0)
""" % (THREADS, BATCH, PROJ_DIM)


def test_sigkill_then_resume_is_bitwise_identical_and_recomputes_nothing(setup, tmp_path):
    model, checkpoints, (x, y, _, _), inputs = setup
    store = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(inputs)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mask_path = store / "model_0" / "finished.npy"
    deadline = time.time() + 120
    done = 0
    try:
        while time.time() < deadline and child.poll() is None:
            if mask_path.exists():
                try:
                    done = int(np.load(mask_path, mmap_mode="r").sum())
                except ValueError:       # header still being written
                    done = 0
                if done >= N_TRAIN // 3:
                    break
            time.sleep(0.05)
        assert child.poll() is None, f"the child ended early: {child.stderr.read().decode()}"
        # While the child holds model 0, a second featurizer of it is refused, not interleaved.
        rival = TRAK(store, digits.make_mlp(16), train_size=N_TRAIN, proj_dim=PROJ_DIM, progress=False)
        with pytest.raises(StoreBusyError, match="model_id 0 .* is being featurized"):
            rival.featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
    finished = np.load(mask_path).astype(bool)
    assert 0 < finished.sum() < N_TRAIN
    assert not json.loads((store / "metadata.json").read_text())["models"]["0"]["featurized"]

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _resume_and_compare(store, tmp_path, checkpoints[0], x, y, finished)
    finally:
        torch.set_num_threads(threads)


def _resume_and_compare(store, tmp_path, checkpoint, x, y, finished):
    mask_path = store / "model_0" / "finished.npy"
    task = CountingTask()
    resumed = TRAK(store, digits.make_mlp(16), train_size=N_TRAIN, proj_dim=PROJ_DIM, task=task,
                   progress=False)
    resumed.featurize(checkpoint, digits.batches(x, y, BATCH), model_id=0)
    # Only unfinished batches, plus the up-front forward check of the first batch.
    assert task.calls == (~finished).reshape(-1, BATCH).all(axis=1).sum() + 1

    whole = TRAK(tmp_path / "whole", digits.make_mlp(16), train_size=N_TRAIN, proj_dim=PROJ_DIM,
                 progress=False)
    whole.featurize(checkpoint, digits.batches(x, y, BATCH), model_id=0)
    for name in ("features.npy", "out_to_loss.npy"):
        a = np.load(store / "model_0" / name)
        b = np.load(tmp_path / "whole" / "model_0" / name)
        assert a.tobytes() == b.tobytes(), name
    assert np.load(mask_path).all()


def test_reopen_with_other_settings_raises(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=32, seed=1, progress=False)
    for changes, pattern in [({"proj_dim": 64}, "proj_dim: store has 32, got 64"),
                             ({"seed": 2}, "seed: store has 1, got 2"),
                             ({"kind": "gaussian"}, "kind: store has 'rademacher', got 'gaussian'"),
                             ({"train_size": 100}, "train_size: store has 200, got 100"),
                             ({"feature_dtype": "float16"}, "feature_dtype"),
                             ({"task": "regression"},
                              "task: store has 'classification', got 'regression'")]:
        settings = dict(train_size=N_TRAIN, proj_dim=32, seed=1, progress=False)
        settings.update(changes)
        with pytest.raises(StoreMismatchError, match=pattern):
            TRAK(tmp_path, model, **settings)
    with pytest.raises(StoreMismatchError, match="num_grad_params"):
        TRAK(tmp_path, digits.make_mlp(32), train_size=N_TRAIN, proj_dim=32, seed=1)


def test_reopen_with_other_grad_wrt_of_the_same_size_raises(tmp_path):
    # Two layers of equal size: only the names tell the stores apart.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    TRAK(tmp_path, model, train_size=10, proj_dim=8, grad_wrt=["0.weight"], progress=False)
    with pytest.raises(StoreMismatchError, match=r"grad_wrt: store has \['0.weight'\], got \['1.weight'\]"):
        TRAK(tmp_path, model, train_size=10, proj_dim=8, grad_wrt=["1.weight"], progress=False)
    TRAK(tmp_path, model, train_size=10, proj_dim=8, grad_wrt=["0.weight"], progress=False)


@pytest.mark.parametrize("bad, error", [
    ({"kind": "normal"}, "kind must be one of"),
    ({"seed": -1}, r"seed must be in \[0, "),
    ({"seed": 1.5}, "seed must be an int"),
    ({"seed": 2**63}, r"seed must be in \[0, "),
    ({"proj_dim": 0}, r"proj_dim must be an int in \[1, 2\*\*31\)"),
    ({"proj_dim": 2**31}, r"proj_dim must be an int in \[1, 2\*\*31\)"),
    ({"proj_dim": 8.0}, "proj_dim must be an int"),
    ({"grad_memory": 0}, "grad_memory must be a positive number of bytes"),
    ({"feature_dtype": "float64"}, "feature_dtype must be one of"),
    ({"task": "ranking"}, "task must be"),
    ({"grad_wrt": ["nope"]}, "grad_wrt names parameters the model does not have"),
])
def test_bad_settings_raise_before_anything_is_written(setup, tmp_path, bad, error):
    model = setup[0]
    settings = dict(train_size=N_TRAIN, proj_dim=8, progress=False)
    with pytest.raises((TypeError, ValueError), match=error):
        TRAK(tmp_path, model, **dict(settings, **bad))
    assert not (tmp_path / "metadata.json").exists()
    TRAK(tmp_path, model, **settings)      # the corrected call works on the same directory
    TRAK(tmp_path, model, **settings)


def test_store_format_version_is_checked(setup, tmp_path):
    model = setup[0]
    TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8, progress=False)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["format_version"] == STORE_FORMAT_VERSION
    metadata["format_version"] = STORE_FORMAT_VERSION + 1
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=f"format version {STORE_FORMAT_VERSION + 1}"):
        TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8)


def test_trak_class_equals_attribute_and_protects_results(setup, tmp_path):
    model, checkpoints, (x, y, xt, yt), _ = setup
    train, targets = digits.batches(x, y, 50), digits.batches(xt, yt, 4)
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=32, progress=False)
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train, model_id=model_id)
    trak.finalize()
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("val", checkpoint, targets, model_id=model_id)
    scores = trak.score("val")
    expected = attribute(model, checkpoints, train, targets, proj_dim=32, progress=False)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-7)

    trak_mode = trak.score("val", ensemble="trak", lambda_reg=1e-3, overwrite=True)
    expected = attribute(model, checkpoints, train, targets, proj_dim=32, ensemble="trak",
                         lambda_reg=1e-3, progress=False)
    np.testing.assert_allclose(trak_mode, expected.numpy(), rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="already has scores"):
        trak.score("val")
    with pytest.raises(ValueError, match="already has target features"):
        trak.featurize_targets("val", checkpoints[0], targets, model_id=0)
    with pytest.raises(ValueError, match="different checkpoint"):
        trak.featurize(checkpoints[1], train, model_id=0)
    with pytest.raises(ValueError, match="not the checkpoint model_id 1"):
        trak.featurize_targets("test", checkpoints[0], targets, model_id=1)
    with pytest.raises(ValueError, match="has 8 targets"):
        trak.featurize_targets("val", checkpoints[0], targets[:1], model_id=0, overwrite=True)

    reopened = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=32, progress=False)
    np.testing.assert_array_equal(reopened.load_scores("val"), trak_mode)


def test_wrong_number_of_train_rows_raises(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match=r"train holds 0 examples \(0 batches\)"):
        trak.featurize(checkpoints[0], [], model_id=0)
    with pytest.raises(ValueError, match=r"train holds 400 examples \(4 batches\), but train_size = 200"):
        trak.featurize(checkpoints[0], digits.batches(torch.cat([x, x]), torch.cat([y, y])), model_id=0)
    # A generator has no length: the count is found while featurizing.
    one_shot = (batch for batch in digits.batches(torch.cat([x, x]), torch.cat([y, y])))
    with pytest.raises(ValueError, match="more than train_size = 200"):
        trak.featurize(checkpoints[0], one_shot, model_id=0)
    with pytest.raises(ValueError, match="train yielded 0 examples.*empty loader"):
        write_train_features(trak.store, trak._featurizer(checkpoints[0], 0), [], 0,
                             feature_dtype="float32", progress=False)
    with pytest.raises(ValueError, match="not fully featurized"):
        trak.finalize([0])


def test_float16_features(setup, tmp_path):
    model, checkpoints, (x, y, xt, yt), _ = setup
    train, targets = digits.batches(x, y, 100), digits.batches(xt, yt)
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=32, feature_dtype="float16", progress=False)
    trak.featurize(checkpoints[0], train, model_id=0)
    assert np.load(tmp_path / "model_0" / "features.npy", mmap_mode="r").dtype == np.float16
    trak.finalize()
    trak.featurize_targets("val", checkpoints[0], targets, model_id=0)
    scores = trak.score("val")
    expected = attribute(model, checkpoints[:1], train, targets, proj_dim=32, progress=False).numpy()
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-2


# ---- several jobs on one store ---------------------------------------------------------------

def _metadata(folder):
    return json.loads((folder / "metadata.json").read_text())


def test_two_openers_featurizing_different_models_keep_both(setup, tmp_path):
    model, checkpoints, (x, y, xt, yt), _ = setup
    train, targets = digits.batches(x, y, 50), digits.batches(xt, yt, 4)
    opts = dict(train_size=N_TRAIN, proj_dim=16, progress=False)
    a, b = TRAK(tmp_path, model, **opts), TRAK(tmp_path, model, **opts)   # both open the empty store
    a.featurize(checkpoints[0], train, model_id=0)
    b.featurize(checkpoints[1], train, model_id=1)
    assert a.model_ids == b.model_ids == [0, 1]
    assert all(entry["featurized"] for entry in _metadata(tmp_path)["models"].values())

    c = TRAK(tmp_path, model, **opts)
    c.finalize()
    for model_id, checkpoint in enumerate(checkpoints):
        b.featurize_targets("val", checkpoint, targets, model_id=model_id)
    scores = np.array(c.score("val"))
    expected = attribute(model, checkpoints, train, targets, proj_dim=16, progress=False)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-7)

    # Stale objects (opened before any of this) neither undo nor redo the others' work.
    before = _metadata(tmp_path)
    a.finalize()
    a.featurize(checkpoints[0], train, model_id=0)       # already featurized: a no-op
    assert _metadata(tmp_path) == before
    assert before["models"].keys() == {"0", "1"}
    assert all(entry["kernels"] for entry in before["models"].values())
    assert before["experiments"]["val"]["scores"]["model_ids"] == [0, 1]
    np.testing.assert_array_equal(a.load_scores("val"), scores)


CONCURRENT_CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
from trak_fast.eval import digits
from trak_fast.pipeline.trak import TRAK
inputs = torch.load(sys.argv[2])
model_id = int(sys.argv[3])
def slow_batches():
    for batch in digits.batches(inputs["x"], inputs["y"], 20):
        time.sleep(0.02)
        yield batch
trak = TRAK(sys.argv[1], digits.make_mlp(16), train_size=len(inputs["x"]), proj_dim=16,
            progress=False)
trak.featurize(inputs["checkpoints"][model_id], slow_batches(), model_id=model_id)
"""


def test_two_processes_featurizing_different_models_keep_both(setup, tmp_path):
    model, checkpoints, (x, y, _, _), inputs = setup
    store = tmp_path / "shared"
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, str(store), str(inputs),
                                  str(model_id)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for model_id in (0, 1)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
    trak = TRAK(store, model, train_size=N_TRAIN, proj_dim=16, progress=False)
    assert trak.model_ids == [0, 1]
    trak.finalize()
    reference = TRAK(tmp_path / "alone", model, train_size=N_TRAIN, proj_dim=16, progress=False)
    for model_id, checkpoint in enumerate(checkpoints):
        reference.featurize(checkpoint, digits.batches(x, y, 20), model_id=model_id)
        np.testing.assert_allclose(np.load(store / f"model_{model_id}" / "features.npy"),
                                   np.load(tmp_path / "alone" / f"model_{model_id}" / "features.npy"),
                                   rtol=1e-5, atol=1e-6)


def test_same_model_featurized_by_two_openers_at_once_is_refused(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    opts = dict(train_size=N_TRAIN, proj_dim=16, progress=False)
    first, second = TRAK(tmp_path, model, **opts), TRAK(tmp_path, model, **opts)
    refused = []

    def loader():
        for index, batch in enumerate(digits.batches(x, y, 50)):
            if index == 1:           # `first` is mid-run and holds model 0
                with pytest.raises(StoreBusyError, match="model_id 0 .* is being featurized"):
                    second.featurize(checkpoints[0], digits.batches(x, y, 50), model_id=0)
                refused.append(True)
                second.featurize(checkpoints[0], digits.batches(x, y, 50), model_id=1)  # others are free
            yield batch

    first.featurize(checkpoints[0], loader(), model_id=0)
    assert refused and first.model_ids == [0, 1]
    assert np.load(tmp_path / "model_0" / "finished.npy").all()
    second.featurize(checkpoints[0], digits.batches(x, y, 50), model_id=0)   # free again: a no-op


# ---- all-zero features -----------------------------------------------------------------------

class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 10)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x)


def test_all_zero_train_features_raise_in_finalize_and_score(setup, tmp_path):
    _, _, (x, y, xt, yt), _ = setup
    model = _WithUnused()
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8, grad_wrt=["unused"], progress=False)
    trak.featurize(model.state_dict(), digits.batches(x, y, 100), model_id=0)
    assert not np.load(tmp_path / "model_0" / "features.npy").any()
    with pytest.raises(ValueError, match="model_id 0: every train feature is zero: the task output "
                                         r"does not depend on the differentiated parameters \(check grad_wrt"):
        trak.finalize()
    assert not _metadata(tmp_path)["models"]["0"]["kernels"]

    # A zero kernel on disk (written by other means) is refused when scoring, too.
    np.save(tmp_path / "model_0" / "kernel_full_out_to_loss_0.npy", np.zeros((8, 8)))
    trak.store.update(lambda metadata: metadata["models"]["0"]["kernels"].update(
        {"full/out_to_loss": [{"layer": "all", "start": 0, "stop": 8, "form": "primal",
                               "file": "kernel_full_out_to_loss_0.npy"}]}))
    trak.featurize_targets("val", model.state_dict(), digits.batches(xt, yt), model_id=0)
    with pytest.raises(ValueError, match="every train feature is zero"):
        trak.score("val")
    assert not list((tmp_path / "experiment_val").glob(".*tmp*"))


# ---- temporary files -------------------------------------------------------------------------

def test_temp_files_of_dead_processes_are_removed_on_open(setup, tmp_path, monkeypatch):
    model, checkpoints, (x, y, xt, yt), _ = setup
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8, progress=False)
    trak.featurize(checkpoints[0], digits.batches(x, y, 100), model_id=0)
    trak.finalize()
    trak.featurize_targets("val", checkpoints[0], digits.batches(xt, yt), model_id=0)

    # An exception (or Ctrl-C) inside score removes its own temporary file.
    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("trak_fast.pipeline.store_scores.add_checkpoint_scores", fail)
    with pytest.raises(KeyboardInterrupt):
        trak.score("val")
    monkeypatch.undo()
    assert not list((tmp_path / "experiment_val").glob(".*tmp*"))

    # A SIGKILLed job cannot clean up: the next open removes files whose writer pid is dead.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / "experiment_val" / f".scores.tmp-{dead.pid}.npy",
             tmp_path / "model_0" / f".kernel.tmp-{dead.pid}.npy",
             tmp_path / f".metadata.json.tmp-{dead.pid}"]
    live = tmp_path / "experiment_val" / f".scores.tmp-{os.getpid()}.npy"  # a write in progress
    for path in stale + [live]:
        path.write_bytes(b"partial")
    TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=8, progress=False)
    assert not any(path.exists() for path in stale)
    assert live.exists()
    live.unlink()
    trak.score("val")
    assert sorted(p.name for p in (tmp_path / "experiment_val").iterdir()) == \
        ["examples.npy", "scores.npy", "targets_0.npy"]
