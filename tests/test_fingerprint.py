"""Example fingerprints: a resumed, reordered or different loader raises instead of mixing rows.

Each test here passed silently (wrong scores, no error) before fingerprints existed.
"""
import numpy as np
import pytest
import torch

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute
from trak_fast.pipeline.fingerprint import (FULL_ELEMENTS, ExampleMismatchError, example_hashes)
from trak_fast.pipeline.trak import TRAK

from counting_task import CountingTask

N_TRAIN, N_TARGETS, BATCH, PROJ_DIM = 60, 6, 10, 16


@pytest.fixture(scope="module")
def setup():
    x, y, xt, yt = digits.load_digits(N_TRAIN + 20, N_TARGETS)
    extra = (x[N_TRAIN:], y[N_TRAIN:])
    x, y = x[:N_TRAIN], y[:N_TRAIN]
    checkpoints = []
    for seed in range(2):
        model = digits.make_mlp(8, seed=seed)
        digits.train(model, x, y, epochs=2, seed=seed)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, checkpoints, (x, y, xt, yt), extra


def one_shot(batches):
    """A generator: no len(), so nothing can be checked before iterating it."""
    return (batch for batch in batches)


def permuted(x, y, seed=0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def make_trak(path, model, task="classification"):
    return TRAK(path, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, task=task, progress=False)


def finished_rows(path, model_id=0):
    return int(np.load(path / f"model_{model_id}" / "finished.npy").sum())


# ---- the hashes ------------------------------------------------------------------------------

def test_hashes_are_per_example_whatever_the_batching(setup):
    _, _, (x, y, _, _), _ = setup
    whole = example_hashes((x[:10], y[:10]))
    split = np.concatenate([example_hashes((x[:4], y[:4])), example_hashes((x[4:10], y[4:10]))])
    np.testing.assert_array_equal(whole, split)
    assert len(np.unique(whole[:, 1])) == 10 and (whole != 0).all()
    order = torch.arange(10).flip(0)
    np.testing.assert_array_equal(example_hashes((x[:10][order], y[:10][order])), whole[order.numpy()])
    # A label, an input pixel or a dtype change the example's hash.
    assert example_hashes((x[:1], y[:1] + 1))[0, 1] != whole[0, 1]
    assert example_hashes((x[:1] + 1e-6 * (x[:1] == 0), y[:1]))[0, 1] != whole[0, 1]
    changed = example_hashes((x[:1].double(), y[:1]))
    assert changed[0, 0] != whole[0, 0] and changed[0, 1] != whole[0, 1]


def test_large_examples_hash_fixed_sampled_positions():
    x = torch.randn(3, FULL_ELEMENTS + 1000, generator=torch.Generator().manual_seed(0))
    base = example_hashes((x, torch.zeros(3, dtype=torch.long)))
    first, last = x.clone(), x.clone()
    first[1, 0] += 1
    last[1, -1] += 1
    for changed in (first, last):
        hashes = example_hashes((changed, torch.zeros(3, dtype=torch.long)))
        assert hashes[1, 1] != base[1, 1]
        np.testing.assert_array_equal(hashes[[0, 2]], base[[0, 2]])


def test_meta_batches_are_refused():
    with pytest.raises(ValueError, match="train batch 0 holds a tensor on the meta device"):
        example_hashes((torch.empty(2, 3, device="meta"), torch.zeros(2, dtype=torch.long)),
                       "train batch 0")


# ---- resume ----------------------------------------------------------------------------------

def test_rows_from_a_loader_with_extra_examples_are_not_kept(setup, tmp_path):
    """The issue's case: 20 examples prepended; the run stops with "more than train_size"."""
    model, checkpoints, (x, y, _, _), (xe, ye) = setup
    clean = tmp_path / "clean"
    make_trak(clean, model).featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)

    store = tmp_path / "store"
    wrong = digits.batches(torch.cat([xe, x]), torch.cat([ye, y]), BATCH)
    with pytest.raises(ValueError, match="more than train_size = 60.*rows written by this call "
                                         "are not kept"):
        make_trak(store, model).featurize(checkpoints[0], one_shot(wrong), model_id=0)
    assert finished_rows(store) == 0
    task = CountingTask()
    make_trak(store, model, task).featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
    assert task.gradient_calls > 0                  # recomputed, nothing stale kept
    np.testing.assert_array_equal(np.load(store / "model_0" / "features.npy"),
                                  np.load(clean / "model_0" / "features.npy"))


def test_rows_from_a_short_loader_are_not_kept(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    with pytest.raises(ValueError, match="train yielded 50 examples.*not kept"):
        make_trak(tmp_path, model).featurize(checkpoints[0], one_shot(digits.batches(x[:50], y[:50], BATCH)),
                                             model_id=0)
    assert finished_rows(tmp_path) == 0


def interrupted(batches, after):
    for index, batch in enumerate(batches):
        if index == after:
            raise KeyboardInterrupt
        yield batch


@pytest.mark.parametrize("loader, message", [
    (lambda x, y, extra: permuted(x, y), r"train batch 0 \(\d+ of 10 examples, rows 0-9\) does not "
     r"match the rows an earlier featurize of model_id 0 wrote \(resume\): some of its examples "
     r"were recorded at other rows.*shuffle=False.*delete '.*model_0' and call featurize again"),
    (lambda x, y, extra: (torch.cat([extra[0][:5], x[:-5]]), torch.cat([extra[1][:5], y[:-5]])),
     r"train batch 0 \(10 of 10 examples, rows 0-9\).*some of its examples were recorded at "
     "other rows, the others not at all"),
    (lambda x, y, extra: (x.flip(1), y), r"train batch 0.*its examples are different ones"),
    (lambda x, y, extra: (x, y.int()), r"train batch 0.*shapes or dtypes of its tensors differ "
     r"\(now \(float32\[64\], int32\[\]\)\)"),
])
def test_resume_with_another_loader_raises_before_any_work(setup, tmp_path, loader, message):
    model, checkpoints, (x, y, _, _), extra = setup
    with pytest.raises(KeyboardInterrupt):
        make_trak(tmp_path, model).featurize(checkpoints[0], interrupted(digits.batches(x, y, BATCH), 3),
                                             model_id=0)
    assert finished_rows(tmp_path) == 30             # an interruption keeps its rows (resumable)
    task = CountingTask()
    with pytest.raises(ExampleMismatchError, match=message):
        make_trak(tmp_path, model, task).featurize(
            checkpoints[0], one_shot(digits.batches(*loader(x, y, extra), BATCH)), model_id=0)
    assert task.gradient_calls == 0
    assert finished_rows(tmp_path) == 30


def test_resume_with_the_same_examples_in_other_batches_works(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    clean = tmp_path / "clean"
    make_trak(clean, model).featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        make_trak(store, model).featurize(checkpoints[0], interrupted(digits.batches(x, y, BATCH), 3),
                                          model_id=0)
    task = CountingTask()
    make_trak(store, model, task).featurize(checkpoints[0], digits.batches(x, y, 15), model_id=0)
    np.testing.assert_allclose(np.load(store / "model_0" / "features.npy"),
                               np.load(clean / "model_0" / "features.npy"), rtol=1e-5, atol=1e-6)


# ---- across checkpoints and targets ----------------------------------------------------------

def test_store_refuses_another_order_for_a_later_model_id(setup, tmp_path):
    model, checkpoints, (x, y, _, _), _ = setup
    make_trak(tmp_path, model).featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
    task = CountingTask()
    with pytest.raises(ExampleMismatchError, match=r"train batch 0 .*does not match the train "
                                                   r"examples of model_id 0: .*another order.*shuffle=False"):
        make_trak(tmp_path, model, task).featurize(checkpoints[1], digits.batches(*permuted(x, y), BATCH),
                                                   model_id=1)
    assert task.gradient_calls == 0


def test_finalize_catches_checkpoints_featurized_at_the_same_time_with_other_orders(setup, tmp_path,
                                                                                     monkeypatch):
    model, checkpoints, (x, y, _, _), _ = setup
    trak = make_trak(tmp_path, model)
    # Two jobs running at once cannot see each other's rows: simulate it.
    monkeypatch.setattr(trak.store, "read_train_examples", lambda model_id: None)
    trak.featurize(checkpoints[0], digits.batches(x, y, BATCH), model_id=0)
    trak.featurize(checkpoints[1], digits.batches(*permuted(x, y), BATCH), model_id=1)
    monkeypatch.undo()
    with pytest.raises(ExampleMismatchError, match="the train rows of model_id 1 .* does not match "
                                                   "those of model_id 0.*another order"):
        trak.finalize()
    assert all(not entry["kernels"] for entry in trak.status()["models"].values())


def test_targets_of_an_experiment_must_match_across_checkpoints(setup, tmp_path):
    model, checkpoints, (x, y, xt, yt), _ = setup
    trak = make_trak(tmp_path, model)
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, digits.batches(x, y, BATCH), model_id=model_id)
    trak.finalize()
    trak.featurize_targets("val", checkpoints[0], digits.batches(xt, yt, 3), model_id=0)
    with pytest.raises(ExampleMismatchError, match=r"targets 'val' batch 0 .*the targets experiment "
                                                   r"'val' was created with.*another order.*shuffle=False"):
        trak.featurize_targets("val", checkpoints[1], digits.batches(xt.flip(0), yt.flip(0), 3),
                               model_id=1)
    assert "1" not in trak.status()["experiments"]["val"]["targets"]
    trak.featurize_targets("val", checkpoints[1], digits.batches(xt, yt, 2), model_id=1)   # other batching: fine


class ReshufflingLoader:
    """Like DataLoader(shuffle=True): a new order every time it is iterated."""

    def __init__(self, x, y):
        self.x, self.y, self.epoch = x, y, 0

    def __iter__(self):
        self.epoch += 1
        return iter(digits.batches(*permuted(self.x, self.y, self.epoch), BATCH))


@pytest.mark.parametrize("which", ["train", "targets"])
def test_attribute_refuses_a_loader_that_reorders_between_checkpoints(setup, which):
    model, checkpoints, (x, y, xt, yt), _ = setup
    loaders = {"train": digits.batches(x, y, BATCH), "targets": digits.batches(xt, yt, 3)}
    loaders[which] = ReshufflingLoader(*((x, y) if which == "train" else (xt, yt)))
    with pytest.raises(ExampleMismatchError, match=rf"{which} batch 0 .*does not match the {which} "
                                                   "examples checkpoint 0 saw.*shuffle=False"):
        attribute(model, checkpoints, loaders["train"], loaders["targets"], proj_dim=PROJ_DIM,
                  progress=False)
