"""Scores against a direct float64 implementation of the formulas."""

import numpy as np
import pytest
import torch

from trak_fast.scoring.kernel import compute_kernel, Kernel
from trak_fast import ScoreSettings
from trak_fast.scoring.scores import finish_ensemble, model_scores


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _direct(phi, targets, lam):
    """S = Phi (Phi^T Phi + lam I)^-1 T^T in float64 with an explicit inverse."""
    k = phi.shape[1]
    return phi @ torch.linalg.inv(phi.T @ phi + lam * torch.eye(k, dtype=torch.float64)) @ targets.T


@pytest.mark.parametrize("n,k", [(80, 16), (12, 40)])   # primal and dual forms
@pytest.mark.parametrize("blocks", [(10_000, 10_000), (7, 3)])
def test_model_scores_match_direct_formula(n, k, blocks):
    phi, targets = _randn(n, k), _randn(9, k, seed=1)
    lam_rel = 0.4
    lam = lam_rel * (phi ** 2).sum() / n
    got = model_scores(phi, targets, compute_kernel(phi), lambda_reg=lam_rel, relative_lambda=True,
                       block_rows=blocks[0], block_targets=blocks[1])
    torch.testing.assert_close(got, _direct(phi, targets, lam.item()), rtol=1e-9, atol=1e-12)


def test_float32_features_score_close_to_float64_formula():
    phi, targets = _randn(200, 32), _randn(11, 32, seed=2)
    got = model_scores(phi.float(), targets.float(), compute_kernel(phi.float()), lambda_reg=1.0,
                       relative_lambda=True)
    expected = _direct(phi, targets, ((phi ** 2).sum() / 200).item())
    assert got.dtype == torch.float32
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_trak_normalization_matches_direct_formula():
    # S = a^2 Phi M T^T / mean|M| with M = (a^2 K + lambda I)^-1, lambda absolute.
    phi, targets = _randn(60, 10), _randn(5, 10, seed=3)
    a, lam = 0.37, 0.05
    m = torch.linalg.inv(a * a * phi.T @ phi + lam * torch.eye(10, dtype=torch.float64))
    expected = (a * phi) @ m @ (a * targets).T / m.abs().mean()
    got = model_scores(phi, targets, compute_kernel(phi), lambda_reg=lam, relative_lambda=False,
                       feature_scale=a, normalize_inverse=True)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_relative_damping_makes_scores_scale_free():
    phi, targets = _randn(50, 8), _randn(4, 8, seed=4)
    base = model_scores(phi, targets, compute_kernel(phi), lambda_reg=1.0, relative_lambda=True)
    scaled = model_scores(3.0 * phi, 3.0 * targets, compute_kernel(3.0 * phi), lambda_reg=1.0,
                          relative_lambda=True)
    torch.testing.assert_close(base, scaled, rtol=1e-9, atol=1e-12)


def test_scores_accumulate_into_memmap(tmp_path):
    phi, targets = _randn(30, 6), _randn(4, 6, seed=5)
    out = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype="float64", shape=(30, 4))
    out[:] = 1.0
    model_scores(phi, targets, compute_kernel(phi), lambda_reg=0.5, relative_lambda=False, out=out,
                 block_rows=8, block_targets=3)
    torch.testing.assert_close(torch.from_numpy(np.array(out)), 1.0 + _direct(phi, targets, 0.5))


def test_ensemble_is_mean_scores_times_mean_out_to_loss():
    phis = [_randn(20, 5, seed=s) for s in range(3)]
    targets = [_randn(4, 5, seed=10 + s) for s in range(3)]
    qs = [torch.rand(20, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(3)]
    acc = torch.zeros(20, 4, dtype=torch.float64)
    for phi, t in zip(phis, targets):
        model_scores(phi, t, compute_kernel(phi), lambda_reg=0.1, relative_lambda=False, out=acc)
    finish_ensemble(acc, sum(qs), 3)
    expected = sum(_direct(p, t, 0.1) for p, t in zip(phis, targets)) / 3 * (sum(qs) / 3)[:, None]
    torch.testing.assert_close(acc, expected)


def _damping(ensemble, lambda_reg, relative_lambda):
    s = ScoreSettings(ensemble=ensemble, lambda_reg=lambda_reg, relative_lambda=relative_lambda)
    return s.lambda_reg, s.relative_lambda


def test_damping_defaults():
    assert _damping("mean", None, None) == (3.0, True)  # the documented default (settings.py)
    assert _damping("trak", None, None) == (0.0, False)
    assert _damping("mean", 1e-3, False) == (1e-3, False)
    with pytest.raises(ValueError, match="ensemble"):
        _damping("median", None, None)


def test_mismatched_target_width_raises():
    phi = _randn(10, 4)
    with pytest.raises(ValueError, match="targets must have shape"):
        model_scores(phi, _randn(3, 5), compute_kernel(phi), lambda_reg=1.0, relative_lambda=True)


def test_trak_mode_refuses_dual_kernel():
    phi = _randn(4, 9)
    with pytest.raises(ValueError, match="primal"):
        model_scores(phi, _randn(2, 9), Kernel(phi @ phi.T, "dual", 4), lambda_reg=1.0,
                     relative_lambda=False, normalize_inverse=True)
