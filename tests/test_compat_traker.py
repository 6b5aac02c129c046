"""A real TRAKer run (trak 0.3.2, CPU) with TrakFastProjector, against trak's own BasicProjector.

Setup: a 64-16-10 MLP (1,210 parameters) trained on 600 digits; 100 targets; k = 256 < n = 600,
so X^T X is invertible with trak's default lambda_reg = 0.

TRAK scores from one checkpoint depend on the random matrix, so two correct projectors do not
give equal scores; what must hold is that our scores agree with BasicProjector's exactly as
well as two BasicProjector seeds agree with each other. The statistic: for two score matrices
[n_train, n_targets], the Spearman correlation over train examples of each target's column,
averaged over targets ("agreement"). With several seeds of each projector:

- ``basic_vs_basic``: agreement of every pair of BasicProjector seeds;
- ``ours_vs_basic``: agreement of every (ours seed, BasicProjector seed) pair.

If our features have the distribution of trak's, ``ours_vs_basic`` estimates the same number
as ``basic_vs_basic``. Measured on this setup, the agreement is ~0.30 and one pair's agreement
varies by sd ~0.005 across seeds (Spearman over 600 examples and 100 targets is stable); the
tolerance 0.03 is about six such sds. The failures this guards against move the agreement far
more: features from inconsistent matrices (train vs target, or pieces permuted) give ~0, as the
shuffled-target control below shows.
"""
import itertools
import logging

import numpy as np
import pytest
import torch

from trak_fast.eval import digits
from trak_fast.compat.trak import TrakFastProjector

import scipy.stats as scipy_stats  # noqa: E402  (scipy comes with scikit-learn, a test dependency)
import trak  # noqa: E402  (traker==0.3.2 is a test dependency)
from trak.gradient_computers import FunctionalGradientComputer  # noqa: E402
from trak.projectors import BasicProjector, ProjectionType  # noqa: E402

N_TRAIN, N_TARGETS, HIDDEN, K = 600, 100, 16, 256
SEEDS = range(3)
TOLERANCE = 0.03


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: a second intra-op thread only adds synchronisation, which on a loaded
    # machine costs ~20x in wall time (measured on the shared 2-core test box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    x, y, x_target, y_target = digits.load_digits(n_train=N_TRAIN, n_targets=N_TARGETS)
    model = digits.train(digits.make_mlp(hidden=HIDDEN, seed=0), x, y, epochs=30, lr=0.1, seed=0)
    assert digits.accuracy(model, x_target, y_target) > 0.8  # a real model, not noise
    grad_dim = sum(p.numel() for p in model.parameters())
    return model, (x, y), (x_target, y_target), grad_dim


def run_traker(setup, projector, save_dir, **traker_kwargs):
    """featurize -> finalize_features -> score -> finalize_scores; returns [n_train, n_targets]."""
    model, (x, y), (x_target, y_target), _ = setup
    traker = trak.TRAKer(
        model=model, task="image_classification", train_set_size=len(x), save_dir=str(save_dir),
        device="cpu", projector=projector, use_half_precision=False, logging_level=logging.ERROR,
        **traker_kwargs,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for batch in digits.batches(x, y, 200):
        traker.featurize(batch, num_samples=len(batch[0]))
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=len(x_target))
    for batch in digits.batches(x_target, y_target, 200):
        traker.score(batch, num_samples=len(batch[0]))
    return np.asarray(traker.finalize_scores("targets"), dtype=np.float64), traker


def agreement(a, b):
    """Per-target Spearman correlation over train examples, averaged over targets."""
    return float(np.mean([scipy_stats.spearmanr(a[:, t], b[:, t])[0] for t in range(a.shape[1])]))


@pytest.fixture(scope="module")
def scores(setup, tmp_path_factory):
    grad_dim = setup[3]
    ours, basic = [], []
    for seed in SEEDS:
        ours.append(run_traker(setup, TrakFastProjector(grad_dim, K, seed, "rademacher", "cpu"),
                               tmp_path_factory.mktemp(f"ours{seed}"))[0])
        # block_size < K: with a single block trak 0.3.2's BasicProjector cannot score after
        # finalize_features() has freed its matrix.
        basic.append(run_traker(setup, BasicProjector(grad_dim, K, seed, ProjectionType.rademacher, "cpu",
                                                      block_size=64),
                                tmp_path_factory.mktemp(f"basic{seed}"))[0])
    return ours, basic


def test_scores_are_finite_and_shaped(scores):
    ours, _ = scores
    for s in ours:
        assert s.shape == (N_TRAIN, N_TARGETS)
        assert np.isfinite(s).all()
        assert np.abs(s).max() > 0


def test_agrees_with_basic_projector_as_well_as_basic_seeds_agree(scores):
    ours, basic = scores
    basic_vs_basic = [agreement(basic[i], basic[j]) for i, j in itertools.combinations(SEEDS, 2)]
    ours_vs_basic = [agreement(o, b) for o in ours for b in basic]
    assert np.mean(basic_vs_basic) > 0.2, basic_vs_basic  # the statistic has signal here
    assert abs(np.mean(ours_vs_basic) - np.mean(basic_vs_basic)) < TOLERANCE, (ours_vs_basic, basic_vs_basic)


def test_control_shuffled_targets_do_not_agree(scores):
    """The statistic can fail: pairing each target with another target's scores gives ~0."""
    ours, basic = scores
    shuffled = np.random.default_rng(0).permutation(N_TARGETS)
    assert (shuffled != np.arange(N_TARGETS)).mean() > 0.9
    assert abs(agreement(ours[0], basic[0][:, shuffled])) < 0.1


class FlatGradientComputer(FunctionalGradientComputer):
    """trak's functional gradients flattened to one [B, p] tensor (trak's own ``vectorize``),
    the form trak's IterativeGradientComputer hands the projector. (IterativeGradientComputer
    itself cannot run the image_classification task in trak 0.3.2: it passes None weights to
    torch.func.functional_call.)"""

    def compute_per_sample_grad(self, batch):
        from trak.utils import vectorize

        return vectorize(super().compute_per_sample_grad(batch), device="cpu")


def test_tensor_gradients_give_the_same_scores_as_dicts(setup, scores, tmp_path):
    """[B, p] tensors and per-parameter dicts are the same gradients, so the same seed must
    give the same features, hence the same scores up to float32 rounding."""
    ours, _ = scores
    grad_dim = setup[3]
    flat, traker = run_traker(setup, TrakFastProjector(grad_dim, K, SEEDS[0], "rademacher", "cpu"),
                              tmp_path, gradient_computer=FlatGradientComputer)
    assert np.allclose(flat, ours[0], rtol=1e-3, atol=1e-3 * np.abs(ours[0]).max())
    # TRAKer recorded our proj_type in its metadata, as it does for its own projectors.
    assert traker.saver.metadata["JL matrix type"] == "rademacher"
