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

from trak_fast import digits
from trak_fast.attribute import attribute
from trak_fast.store import STORE_FORMAT_VERSION, StoreMismatchError
from trak_fast.tasks import ClassificationTask
from trak_fast.trak import TRAK

N_TRAIN, N_TARGETS, BATCH = 200, 8, 10
PROJ_DIM = 64
# The CPU projection's last bits depend on the number of torch threads (its GEMMs are split
# differently), so both processes run with one thread: bitwise resume holds for the same
# loader, device and thread count.
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
    torch.save({"checkpoint": checkpoints[0], "x": x, "y": y}, folder / "inputs.pt")
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
from trak_fast import digits
from trak_fast.trak import TRAK
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
    assert task.calls == (~finished).reshape(-1, BATCH).all(axis=1).sum()  # only unfinished batches

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
                             ({"feature_dtype": "float16"}, "feature_dtype")]:
        settings = dict(train_size=N_TRAIN, proj_dim=32, seed=1, progress=False)
        settings.update(changes)
        with pytest.raises(StoreMismatchError, match=pattern):
            TRAK(tmp_path, model, **settings)
    with pytest.raises(StoreMismatchError, match="num_grad_params"):
        TRAK(tmp_path, digits.make_mlp(32), train_size=N_TRAIN, proj_dim=32, seed=1)


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
    with pytest.raises(ValueError, match="train yielded 0 examples.*empty loader"):
        trak.featurize(checkpoints[0], [], model_id=0)
    with pytest.raises(ValueError, match="more than train_size = 200"):
        trak.featurize(checkpoints[0], digits.batches(torch.cat([x, x]), torch.cat([y, y])), model_id=0)
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
