"""Mistakes caught before any gradient is computed, with a message that says what to fix.

Every test checks that no featurizing happened first: a task that counts the calls every
gradient path makes (``output``/``outputs``), and for the store that no rows were written.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute
from trak_fast.features.loop import featurize
from trak_fast.pipeline.trak import TRAK

from counting_task import CountingTask

N_TRAIN, N_TARGETS, BATCH, PROJ_DIM = 60, 6, 10, 16


@pytest.fixture(scope="module")
def setup():
    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    checkpoints = []
    for seed in range(3):
        model = digits.make_mlp(8, seed=seed)
        digits.train(model, x, y, epochs=2, seed=seed)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, checkpoints, (x, y, xt, yt)


def run_attribute(setup, *, checkpoints=None, train=None, targets=None, **kwargs):
    model, default_checkpoints, (x, y, xt, yt) = setup
    task = CountingTask()
    try:
        return attribute(model, default_checkpoints if checkpoints is None else checkpoints,
                         digits.batches(x, y, BATCH) if train is None else train,
                         digits.batches(xt, yt, 3) if targets is None else targets,
                         task=task, proj_dim=PROJ_DIM, progress=False, **kwargs)
    finally:
        assert task.gradient_calls == 0, "featurizing started before the mistake was reported"


@pytest.mark.parametrize("gradients", ["hooks", "vmap"])
def test_the_counter_sees_featurizing_on_every_gradient_path(setup, gradients):
    """Control: "no gradient calls" below means something on either path."""
    model, checkpoints, (x, y, xt, yt) = setup
    task = CountingTask()
    attribute(model, checkpoints[:1], digits.batches(x, y, BATCH), digits.batches(xt, yt, 3),
              task=task, proj_dim=PROJ_DIM, gradients=gradients, progress=False)
    assert task.gradient_calls >= len(digits.batches(x, y, BATCH))


def _with(checkpoint, name, value):
    return dict(checkpoint, **{name: value})


def test_width_mismatched_third_checkpoint(setup):
    _, checkpoints, _ = setup
    wider = digits.make_mlp(16).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint 2\['0.weight'\] has shape \(16, 64\), the "
                                         r"model's 0.weight has shape \(8, 64\)"):
        run_attribute(setup, checkpoints=checkpoints[:2] + [wider])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights(setup, bad):
    _, checkpoints, _ = setup
    weight = checkpoints[1]["2.weight"].clone()
    weight[3, 4] = bad
    with pytest.raises(ValueError, match=r"checkpoint 1\['2.weight'\] holds 1 NaN or infinite "
                                         r"values \(of 80\).*finite weights"):
        run_attribute(setup, checkpoints=[checkpoints[0], _with(checkpoints[1], "2.weight", weight)])


def test_buffers_may_hold_infinities_but_not_nan():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.register_buffer("mask", torch.tensor([0.0, 0.0, -math.inf]))

        def forward(self, x):
            return self.linear(x) + self.mask.clamp(min=-30)

    model = Masked()
    batches = [(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 2]))]
    phi = featurize(model, model.state_dict(), batches, proj_dim=8).phi     # -inf: fine
    assert torch.isfinite(phi).all()
    broken = _with(model.state_dict(), "mask", torch.tensor([0.0, math.nan, 0.0]))
    with pytest.raises(ValueError, match=r"checkpoint 0\['mask'\] holds 1 NaN values"):
        attribute(model, [broken], batches, batches, proj_dim=8, progress=False)


def test_targets_without_labels(setup):
    _, _, (_, _, xt, _) = setup
    with pytest.raises(TypeError, match=r"targets batch 0: the classification task expects "
                                        r"\(inputs, labels\) batches, got Tensor"):
        run_attribute(setup, targets=[xt[:3], xt[3:]])


def test_empty_targets(setup):
    with pytest.raises(ValueError, match="targets yielded no batches"):
        run_attribute(setup, targets=[])
    with pytest.raises(ValueError, match="targets yielded no batches"):
        run_attribute(setup, checkpoints=setup[1][:1], targets=iter([]))


def test_one_shot_iterator_with_several_checkpoints(setup):
    _, _, (x, y, xt, yt) = setup
    with pytest.raises(TypeError, match=r"train is a one-shot iterator \(generator: iter\(train\) "
                                        r"is train\).*3 checkpoints.*list of batches or a DataLoader"):
        run_attribute(setup, train=(b for b in digits.batches(x, y, BATCH)))
    with pytest.raises(TypeError, match=r"targets is a one-shot iterator \(list_iterator"):
        run_attribute(setup, targets=iter(digits.batches(xt, yt, 3)))


def test_one_shot_iterator_with_one_checkpoint_still_works(setup):
    model, checkpoints, (x, y, xt, yt) = setup
    expected = attribute(model, checkpoints[:1], digits.batches(x, y, BATCH), digits.batches(xt, yt, 3),
                         proj_dim=PROJ_DIM, progress=False)
    got = attribute(model, checkpoints[:1], (b for b in digits.batches(x, y, BATCH)),
                    iter(digits.batches(xt, yt, 3)), proj_dim=PROJ_DIM, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_labels_out_of_range_in_the_last_batch(setup):
    _, _, (x, y, _, _) = setup
    bad = y.clone()
    bad[-1] = 10
    with pytest.raises(ValueError, match=r"train batch 5: labels must lie in \[0, 10\) for a model "
                                         r"with 10 logits, got labels in \[\d, 10\]"):
        run_attribute(setup, train=digits.batches(x, bad, BATCH))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, bad), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"train \(its TensorDataset\): labels must lie in \[0, 10\)"):
        run_attribute(setup, train=loader)


@pytest.mark.parametrize("what", ["train", "targets"])
def test_shuffling_dataloader(setup, what):
    _, checkpoints, (x, y, xt, yt) = setup
    data = (x, y) if what == "train" else (xt, yt)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match=rf"{what} is a DataLoader with a random sampler "
                                         r"\(RandomSampler, e.g. shuffle=True\).*pass shuffle=False"):
        run_attribute(setup, checkpoints=checkpoints[:1], **{what: loader})


def test_cuda_without_a_gpu_or_with_a_missing_index(setup, tmp_path):
    model = setup[0]
    missing = f"cuda:{torch.cuda.device_count()}"     # one past the last GPU, on any machine
    message = (r"needs a CUDA GPU, but torch.cuda.is_available\(\) is False"
               if not torch.cuda.is_available() else rf"names GPU {torch.cuda.device_count()}")
    with pytest.raises(ValueError, match=rf"device='{missing}' {message}"):
        run_attribute(setup, device=missing)
    with pytest.raises(ValueError, match=rf"device='{missing}' {message}"):
        TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, device=missing)
    assert not (tmp_path / "metadata.json").exists()
    with pytest.raises(ValueError, match=rf"device='{missing}' {message}"):
        featurize(model, model.state_dict(), digits.batches(*setup[2][:2]), device=missing)


def test_meta_device_models_checkpoints_and_batches(setup):
    model, checkpoints, (x, y, xt, yt) = setup
    meta_model = digits.make_mlp(8).to("meta")
    with pytest.raises(ValueError, match=r"the model's parameters are on the meta device.*"
                                         r"device=None; pass device='cpu'"):
        attribute(meta_model, checkpoints, digits.batches(x, y), digits.batches(xt, yt), progress=False)
    # A meta model with real checkpoints and an explicit device is fine: nothing is read from it.
    got = attribute(meta_model, checkpoints[:1], digits.batches(x, y, BATCH), digits.batches(xt, yt, 3),
                    proj_dim=PROJ_DIM, device="cpu", progress=False)
    expected = attribute(model, checkpoints[:1], digits.batches(x, y, BATCH), digits.batches(xt, yt, 3),
                         proj_dim=PROJ_DIM, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    meta_weight = checkpoints[1]["0.weight"].to("meta")
    with pytest.raises(ValueError, match=r"checkpoint 1\['0.weight'\] is on the meta device"):
        run_attribute(setup, checkpoints=[checkpoints[0], _with(checkpoints[1], "0.weight", meta_weight)])
    with pytest.raises(ValueError, match=r"train batch 0 holds a tensor on the meta device"):
        run_attribute(setup, train=[(x[:5].to("meta"), y[:5])])
    with pytest.raises(ValueError, match=r"device='meta' computes nothing"):
        run_attribute(setup, device="meta")


# ---- the store -------------------------------------------------------------------------------

def _no_rows_written(path, model_id=0):
    finished = path / f"model_{model_id}" / "finished.npy"
    return not finished.exists() or np.load(finished).sum() == 0


@pytest.mark.parametrize("make_loader, message", [
    (lambda x, y: digits.batches(x[:55], y[:55], BATCH),
     r"train holds 55 examples \(6 batches\), but train_size = 60"),
    (lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:50], y[:50]), batch_size=7),
     r"train holds 50 examples \(a DataLoader over 50 examples\), but train_size = 60"),
    (lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7,
                                              drop_last=True),
     r"train holds 56 examples \(a DataLoader over 56 examples\), but train_size = 60"),
    (lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7,
                                              shuffle=True),
     r"random sampler \(RandomSampler, e.g. shuffle=True\).*pass shuffle=False"),
])
def test_store_checks_the_loader_before_writing_rows(setup, tmp_path, make_loader, message):
    model, checkpoints, (x, y, _, _) = setup
    task = CountingTask()
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, task=task, progress=False)
    with pytest.raises(ValueError, match=message):
        trak.featurize(checkpoints[0], make_loader(x, y), model_id=0)
    assert task.gradient_calls == 0 and _no_rows_written(tmp_path)


def test_store_refuses_a_nan_checkpoint_before_writing_anything(setup, tmp_path):
    model, checkpoints, (x, y, _, _) = setup
    broken = _with(checkpoints[0], "0.bias", torch.full((8,), math.nan))
    task = CountingTask()
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, task=task, progress=False)
    with pytest.raises(ValueError, match=r"checkpoint 3\['0.bias'\] holds 8 NaN or infinite values"):
        trak.featurize(broken, digits.batches(x, y, BATCH), model_id=3)
    assert task.gradient_calls == 0 and trak.model_ids == []


def test_store_targets_without_labels(setup, tmp_path):
    model, checkpoints, (x, y, xt, yt) = setup
    trak = TRAK(tmp_path, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, progress=False)
    trak.featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
    with pytest.raises(TypeError, match=r"targets 'val' batch 0: the classification task expects"):
        trak.featurize_targets("val", checkpoints[0], [xt], model_id=0)
    assert "val" not in trak.status()["experiments"]
