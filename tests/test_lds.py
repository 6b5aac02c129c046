"""LDS math: ranks with ties, Spearman, subsets, margins, the score on a hand-computed case."""
from __future__ import annotations

import math

import pytest
import torch

from trak_fast.eval import lds as L


def _average_ranks_reference(values: list) -> list:
    """Plain-Python average ranks (1-based), the textbook definition."""
    ranks = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def _spearman_reference(a: list, b: list) -> float:
    ra, rb = _average_ranks_reference(a), _average_ranks_reference(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den


def test_rankdata_ties_by_hand():
    assert L.rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert L.rankdata(torch.tensor([[3.0, 3.0, 3.0], [1.0, 0.0, 1.0]])).tolist() == [[2.0, 2.0, 2.0], [2.5, 1.0, 2.5]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_matches_reference_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (5, 40), generator=g).double()   # many ties
    b = a + torch.randint(-3, 4, (5, 40), generator=g).double()
    ours = L.spearman(a, b)
    try:
        from scipy.stats import spearmanr
        ref = [spearmanr(a[r].numpy(), b[r].numpy()).statistic for r in range(5)]
    except ImportError:  # pragma: no cover - scipy is a test dependency, but keep a float64 reference
        ref = [_spearman_reference(a[r].tolist(), b[r].tolist()) for r in range(5)]
    plain = [_spearman_reference(a[r].tolist(), b[r].tolist()) for r in range(5)]
    assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ours, torch.tensor(plain, dtype=torch.float64), atol=1e-12)


def test_spearman_constant_row_is_nan_and_short_input_raises():
    r = L.spearman(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert math.isnan(r[0].item()) and r[1].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        L.spearman(torch.tensor([1.0]), torch.tensor([2.0]))


def test_lds_hand_computed():
    # 4 training examples, 2 targets, 3 subsets {0,1}, {1,2}, {2,3}.
    scores = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 1.0], [4.0, 0.0]])
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # predicted: target 0 -> 3, 5, 7 ; target 1 -> 1, 2, 1 (a tie)
    assert L.predicted_margins(scores, masks).tolist() == [[3.0, 1.0], [5.0, 2.0], [7.0, 1.0]]
    margins = torch.tensor([[0.1, 0.0], [0.3, 5.0], [0.2, 1.0]])
    # target 0: ranks (1,2,3) vs (1,3,2): rho = 1 - 6*2/(3*8) = 0.5
    # target 1: ranks (1.5,3,1.5) vs (1,3,2): centred (-.5,1,-.5)·(-1,1,0) = 1.5; norms 1.5, 2 -> 1.5/sqrt(3)
    per_target = L.lds_per_target(scores, masks, margins)
    assert per_target.tolist() == pytest.approx([0.5, 1.5 / math.sqrt(3.0)], abs=1e-12)
    result = L.lds(scores, masks, margins, n_boot=200)
    assert result.mean == pytest.approx((0.5 + 1.5 / math.sqrt(3.0)) / 2, abs=1e-12)
    assert result.ci_low <= result.mean <= result.ci_high


def test_lds_of_the_true_linear_model_is_one_and_shape_errors():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=g, dtype=torch.float64)
    masks = L.draw_subsets(50, 30, 0.5, seed=3)
    margins = masks.double() @ scores * 2.0 + 1.0       # any increasing map of the truth
    assert torch.allclose(L.lds_per_target(scores, masks, margins), torch.ones(7, dtype=torch.float64))
    assert L.lds_per_target(-scores, masks, margins).max().item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="margins must be"):
        L.lds_per_target(scores, masks, margins[:, :3])
    with pytest.raises(ValueError, match="masks"):
        L.predicted_margins(scores, masks[:, :10])


def test_draw_subsets_sizes_reproducible_and_prefix_stable():
    a = L.draw_subsets(101, 20, 0.3, seed=5)
    assert a.dtype == torch.bool and a.shape == (20, 101)
    assert a.sum(dim=1).tolist() == [30] * 20
    assert torch.equal(a, L.draw_subsets(101, 20, 0.3, seed=5))
    assert torch.equal(a[:7], L.draw_subsets(101, 7, 0.3, seed=5))
    assert not torch.equal(a, L.draw_subsets(101, 20, 0.3, seed=6))
    with pytest.raises(ValueError, match="alpha"):
        L.draw_subsets(10, 2, 1.5)


def test_classification_margins_is_log_odds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (8,), generator=g)
    p = torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    assert torch.allclose(L.classification_margins(logits, labels), torch.log(p / (1 - p)), atol=1e-10)


def test_bootstrap_ci_width_matches_normal_theory():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(400, generator=g, dtype=torch.float64)
    lo, hi = L.bootstrap_ci(v, n_boot=4000, seed=1)
    expected = 2 * 1.96 * v.std().item() / math.sqrt(400)
    assert lo < v.mean().item() < hi
    assert (hi - lo) == pytest.approx(expected, rel=0.15)
    with_nan = torch.cat([v, torch.tensor([float("nan")], dtype=torch.float64)])
    assert L.bootstrap_ci(with_nan, n_boot=4000, seed=1) == pytest.approx((lo, hi), abs=0.02)
