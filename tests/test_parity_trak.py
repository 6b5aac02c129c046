"""Parity with MadryLab trak 0.3.2 (traker, installed as a test dependency), on its CPU path."""
import copy
import logging

import pytest
import torch

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute

import trak  # noqa: E402,F401  (traker==0.3.2 is a test dependency: a missing peer must fail, not skip)
from trak import TRAKer  # noqa: E402
from trak.projectors import BasicProjector, NoOpProjector  # noqa: E402

N_TRAIN, N_TARGETS = 300, 20


@pytest.fixture(scope="module")
def setup():
    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    checkpoints = []
    for seed in range(3):
        model = digits.make_mlp(16, seed=seed)
        digits.train(model, x, y, epochs=8, seed=seed)
        checkpoints.append(copy.deepcopy(model.state_dict()))
    return model, checkpoints, digits.batches(x, y, 100), digits.batches(xt, yt, 10)


def trak_scores(model, checkpoints, train, targets, lambda_reg, projector, tmp_path):
    """MadryLab trak's scores; it loads checkpoints into the model, so it gets a copy."""
    traker = TRAKer(model=copy.deepcopy(model), task="image_classification", train_set_size=N_TRAIN,
                    save_dir=str(tmp_path), device="cpu", projector=projector,
                    use_half_precision=False, lambda_reg=lambda_reg, logging_level=logging.ERROR)
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in train:
            traker.featurize(batch, num_samples=len(batch[1]))
    traker.finalize_features()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint("targets", checkpoint, model_id, num_targets=N_TARGETS)
        for batch in targets:
            traker.score(batch, num_samples=len(batch[1]))
    return torch.tensor(traker.finalize_scores("targets")[:].copy())


@pytest.mark.parametrize("num_models", [1, 3])
def test_no_projection_equals_trak_noop_projector(setup, tmp_path, num_models):
    model, checkpoints, train, targets = setup
    checkpoints = checkpoints[:num_models]
    expected = trak_scores(model, checkpoints, train, targets, 1e-2, NoOpProjector(device="cpu"), tmp_path)
    got = attribute(model, checkpoints, train, targets, proj_dim=None, ensemble="trak",
                    lambda_reg=1e-2, progress=False)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-4


def _column_correlations(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def test_projected_agreement_matches_agreement_between_trak_seeds(setup, tmp_path):
    """k = 512 Rademacher: trak_fast agrees with trak as well as trak agrees with itself."""
    model, checkpoints, train, targets = setup
    checkpoints = checkpoints[:1]
    p = sum(t.numel() for t in checkpoints[0].values())

    def basic(seed):
        return BasicProjector(grad_dim=p, proj_dim=512, seed=seed, proj_type="rademacher",
                              device="cpu", dtype=torch.float32)

    lam = 1e-2
    trak_a = trak_scores(model, checkpoints, train, targets, lam, basic(0), tmp_path / "a")
    trak_b = trak_scores(model, checkpoints, train, targets, lam, basic(1), tmp_path / "b")
    ours = attribute(model, checkpoints, train, targets, proj_dim=512, ensemble="trak",
                     lambda_reg=lam, seed=0, progress=False)
    between_seeds = _column_correlations(trak_a, trak_b)
    ours_vs_trak = _column_correlations(ours, trak_a)
    difference = ours_vs_trak - between_seeds        # paired over targets
    noise = difference.std() / N_TARGETS ** 0.5
    assert between_seeds.mean() > 0.5                # the comparison is meaningful
    assert abs(difference.mean().item()) <= 3 * noise.item() + 0.02
    # The scale is the same too (trak's feature normalization is reproduced).
    ratio = ours.norm() / trak_a.norm()
    assert 0.8 < ratio.item() < 1.25
