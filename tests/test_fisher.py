"""curvature="fisher": the sampled-label gradients estimate the true Fisher, the solver is exact."""
import numpy as np
import pytest
import torch
from torch import nn

import trak_fast
from trak_fast.features.layout import FeatureBlock
from trak_fast.features.featurizer import FisherFeaturizer
from trak_fast.features.tasks.likelihood import (LogLikelihoodTask, SampledLogLikelihoodTask,
                                                 example_uniforms, keyed_uniforms, sample_labels)
from trak_fast.scoring.fisher import fisher_scores


@pytest.mark.parametrize("n_f", [40, 6])            # primal (k_l <= n_f) and Woodbury solves
def test_fisher_scores_equal_the_explicit_inverse(n_f):
    g = torch.Generator().manual_seed(0)
    train, sampled, targets = (torch.randn(n, 12, generator=g, dtype=torch.float64)
                               for n in (9, n_f, 4))
    blocks = [FeatureBlock("a", 0, 5, "a"), FeatureBlock("b", 5, 12, "b")]
    got = fisher_scores(train, sampled, targets, blocks, c=0.3)
    expected = torch.zeros(9, 4, dtype=torch.float64)
    for b in blocks:
        s = sampled[:, b.start:b.stop]
        f = s.T @ s / n_f
        # c times the mean of F's nonzero eigenvalues (rank min(k_l, n_f)), from eigvalsh.
        eig = torch.linalg.eigvalsh(f)
        lam = 0.3 * eig[eig > 1e-10 * eig.max()].mean()
        expected += train[:, b.start:b.stop] @ torch.linalg.inv(
            f + lam * torch.eye(f.shape[0], dtype=torch.float64)) @ targets[:, b.start:b.stop].T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_sampled_labels_follow_the_softmax_and_depend_on_the_example_only():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    x = torch.arange(3000 * 4, dtype=torch.float64).reshape(3000, 4)      # 3000 distinct examples
    drawn = sample_labels(logits.expand(3000, 4), example_uniforms((x,), seed=5, width=1)[:, 0])
    freq = torch.bincount(drawn, minlength=4).double() / 3000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.03, rtol=0)
    # Row b's draw is a function of example b and the seed: another batch composition, the same.
    alone = example_uniforms((x[17:18],), seed=5, width=3)
    torch.testing.assert_close(example_uniforms((x,), seed=5, width=3)[17:18], alone)
    assert not torch.equal(example_uniforms((x[17:18],), seed=6, width=3), alone)


def test_sampled_gradients_estimate_the_true_fisher():
    """Linear softmax classifier: E[s s^T] over label draws = (diag p - p p^T) (x) x x^T, the
    exact Fisher (Gauss-Newton) of the loss; the mean over 4000 draws is within 10%."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    task = trak_fast.ClassificationTask()
    draws = []
    for seed in range(4000):
        task_s = SampledLogLikelihoodTask(task, seed)
        batch = task_s.keyed((x, torch.zeros(1, dtype=torch.long)))
        draws.append(trak_fast.featurize(model, model.state_dict(), [batch],
                                         task=task_s, proj_dim=None, out_to_loss=False).phi[0])
    s = torch.stack(draws)
    estimate = s.T @ s / len(draws)
    p = torch.softmax(model(x)[0], 0).detach()
    exact = torch.kron(torch.diag(p) - torch.outer(p, p), x.T @ x)     # W row-major: [out, in]
    assert ((estimate - exact).norm() / exact.norm()).item() < 0.1
    # The log-likelihood task's rows are minus the loss gradient.
    y = torch.tensor([2])
    g = trak_fast.featurize(model, model.state_dict(), [(x, y)], task=LogLikelihoodTask(task),
                            proj_dim=None, out_to_loss=False).phi[0]
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, model.weight)
    torch.testing.assert_close(g, -grad.reshape(-1))


def test_attribute_with_fisher_curvature_runs_and_refuses_what_it_cannot_do(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 40, (12, 8))
    train = [{"input_ids": ids[i:i + 6]} for i in (0, 6)]
    targets = [{"input_ids": ids[:3]}]
    kwargs = dict(task="language_modeling", proj_dim=64, projection="per_layer",
                  kernel="per_layer", curvature="fisher", progress=False)
    scores = trak_fast.attribute(model, [model.state_dict()], train, targets, **kwargs)
    assert scores.shape == (12, 3) and torch.isfinite(scores).all()
    # A train example scores its own copy among the targets highly: the diagonal leads.
    assert (scores[:3].diagonal() > scores[3:].max(0).values).float().mean() >= 2 / 3
    with pytest.raises(ValueError, match="curvature='fisher' takes ensemble='mean'"):
        trak_fast.ScoreSettings(curvature="fisher", ensemble="trak")
    # The store: [G | S] rows, resumable like TRAK's; the same scores as attribute().
    settings = dict(task="language_modeling", proj_dim=64, projection="per_layer", progress=False)
    trak = trak_fast.TRAK(tmp_path / "s", model, train_size=12, curvature="fisher", **settings)
    trak.featurize(model.state_dict(), train, model_id=0)
    trak.finalize()                                   # nothing to save for the Fisher
    trak.featurize_targets("x", model.state_dict(), targets, model_id=0)
    stored = trak.score("x", kernel="per_layer", curvature="fisher")
    np.testing.assert_allclose(stored, scores.numpy(), rtol=1e-4, atol=1e-4 * scores.abs().max().item())
    assert trak.status()["settings"]["curvature"] == "fisher"
    with pytest.raises(ValueError, match="holds the train rows of curvature='fisher'"):
        trak.score("x", kernel="per_layer", curvature="kernel", overwrite=True)
    with pytest.raises(trak_fast.StoreMismatchError, match="curvature"):
        trak_fast.TRAK(tmp_path / "s", model, train_size=12, curvature="kernel", **settings)


def test_keyed_uniforms_are_uniform_and_run_under_vmap():
    keys = torch.arange(20000, dtype=torch.int64) * 7919 + 2**40
    u = keyed_uniforms(keys, 3)
    assert u.shape == (20000, 3) and 0 < u.min() and u.max() < 1
    # Each column and the pairs across columns look like independent U(0, 1).
    torch.testing.assert_close(u.mean(0), torch.full((3,), 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    assert abs(torch.corrcoef(u.T)[0, 1]) < 0.03
    torch.testing.assert_close(torch.func.vmap(lambda k: keyed_uniforms(k, 3))(keys), u, rtol=0, atol=0)


def test_fisher_rows_are_the_same_on_the_hook_and_vmap_paths():
    """The sampled labels travel with each example (its key), so the vmap path draws what the
    hook path draws: [G | S] equal on both, for a small LM batch with padding."""
    torch.manual_seed(0)
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos, self.out = nn.Embedding(11, 6), nn.Embedding(7, 6), nn.Linear(6, 11)

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.out(torch.tanh(self.emb(input_ids) + self.pos(position_ids)))
    model = TinyLM().double()
    task = trak_fast.LanguageModelingTask(fisher_chunks=1)
    ids = torch.randint(0, 11, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    rows = {}
    for path in ("hooks", "vmap"):
        settings = trak_fast.FeatureSettings(proj_dim=None, gradients=path)
        rows[path] = FisherFeaturizer(model, model.state_dict(), task=task, settings=settings,
                                      model_id=3).compute(batch, 4)[0]
    k = rows["hooks"].shape[1] // 2
    assert rows["hooks"][:, k:].abs().sum() > 0
    assert not torch.allclose(rows["hooks"][:, :k], rows["hooks"][:, k:])   # other labels
    torch.testing.assert_close(rows["vmap"], rows["hooks"], rtol=1e-10, atol=1e-12)
    # Chunk rows split the positions: for each example they sum to its one-chunk row (raw
    # gradients and the factored projection alike), and each chunk holds only its positions.
    for settings in (trak_fast.FeatureSettings(proj_dim=None),
                     trak_fast.FeatureSettings(projection="factored", factored_dims=(3, 4))):
        one = FisherFeaturizer(model, model.state_dict(), task=task, settings=settings,
                               model_id=3).compute(batch, 4)[0]
        k = one.shape[1] // 2
        chunked = FisherFeaturizer(model, model.state_dict(), settings=settings, model_id=3,
                                   task=trak_fast.LanguageModelingTask(fisher_chunks=3)
                                   ).compute(batch, 4)[0]
        assert chunked.shape == (4, 4 * k)
        torch.testing.assert_close(chunked[:, :k], one[:, :k], rtol=0, atol=0)       # G
        parts = chunked[:, k:].reshape(4, 3, k)
        torch.testing.assert_close(parts.sum(1), one[:, k:], rtol=1e-10, atol=1e-12)
        # 7 positions in chunks of 3, 3, 1: the last holds position 6 alone, which predicts
        # nothing (and this model mixes no positions), so its row is zero; the others are not.
        norms = parts.abs().sum(-1)
        assert (norms[:, :2] > 0).all() and (norms[:, 2] == 0).all()
    # Parameters on the vmap path (no positions there): one row per example, as with 1 chunk.
    on_vmap = FisherFeaturizer(model, model.state_dict(), task=trak_fast.LanguageModelingTask(),
                               settings=trak_fast.FeatureSettings(proj_dim=None, gradients="vmap"),
                               model_id=3)
    assert on_vmap.chunks == 1
    torch.testing.assert_close(on_vmap.compute(batch, 4)[0], rows["vmap"], rtol=0, atol=0)
