"""trak_fast.compat.dattri against dattri 0.3.0 itself: the drop-in random_project, and
dattri's TRAKAttributor run with it."""
import pytest
import torch
import torch.nn as nn

dattri_projection = pytest.importorskip("dattri.func.projection")
from dattri.algorithm import trak as dattri_trak  # noqa: E402
from dattri.algorithm.trak import TRAKAttributor  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import trak_fast  # noqa: E402
from trak_fast.compat import dattri as td  # noqa: E402
from trak_fast.eval.digits import load_digits, make_mlp, train  # noqa: E402

ORIGINAL = dattri_projection.random_project


def test_random_project_matches_trak_fast_project():
    g = torch.randn(6, 500)
    f = td.random_project(g, 6, 64, 32, proj_seed=3, proj_type="rademacher")
    for e in (0, 2):
        expected = trak_fast.project(g, 64, seed=trak_fast.model_seed(3, e), kind="rademacher")
        assert torch.equal(f(g, ensemble_id=e), expected)
    assert not torch.allclose(f(g, ensemble_id=0), f(g, ensemble_id=1))
    normal = td.random_project(g, 6, 64, 32, proj_seed=3)  # dattri's default type, "normal"
    assert torch.equal(normal(g), trak_fast.project(g, 64, seed=trak_fast.model_seed(3, 0), kind="gaussian"))
    sjlt = td.random_project(g, 6, 64, 32, proj_type="sjlt", sjlt_nnz=2)
    assert torch.equal(sjlt(g), trak_fast.project(g, 64, seed=trak_fast.model_seed(0, 0), kind="sparse", nnz=2))


def test_random_project_dict_dtype_and_norm_convention():
    feats = {"w": torch.randn(5, 10, 20, dtype=torch.float64), "b": torch.randn(5, 10, dtype=torch.float64)}
    f = td.random_project(feats, 5, 128, 32, proj_type="normal")
    out = f(feats)
    flat = torch.cat([feats["w"].reshape(5, -1), feats["b"]], dim=1)
    assert out.dtype == torch.float64 and out.shape == (5, 128)
    assert torch.allclose(out, f(flat), rtol=1e-12, atol=1e-12)
    # dattri's convention: entries scaled by 1/sqrt(proj_dim), so norms are preserved on
    # average, as dattri's own projector does.
    g = torch.randn(1, 4000, dtype=torch.float64)
    for proj_type in ("normal", "rademacher", "sjlt"):
        ours = torch.tensor([td.random_project(g, 1, 256, 32, proj_seed=s, proj_type=proj_type)(g).norm().item()
                             for s in range(30)])
        assert abs((ours**2).mean().item() / g.norm().item() ** 2 - 1) < 0.1
    half = td.random_project(torch.randn(2, 30).half(), 2, 16, 8)(torch.randn(2, 30).half())
    assert half.dtype == torch.float16


def test_other_types_are_dattris_and_bad_types_fail():
    g = torch.randn(4, 50)
    assert torch.equal(td.random_project(g, 4, 50, 32, proj_type="identity")(g), g)
    with pytest.raises(ValueError, match="proj_type must be one of"):
        td.random_project(g, 4, 16, 32, proj_type="dense")
    with pytest.raises(ValueError, match="proj_seed"):
        td.random_project(g, 4, 16, 32, proj_seed=-1)


def test_context_manager_installs_and_restores_even_on_exceptions():
    assert dattri_trak.random_project is ORIGINAL
    with td.use_trak_fast():
        assert dattri_projection.random_project is not ORIGINAL
        assert dattri_trak.random_project is dattri_projection.random_project
        with td.use_trak_fast(sjlt_nnz=4):  # nesting restores the outer one
            inner = dattri_trak.random_project
        assert dattri_trak.random_project is not inner
    assert dattri_trak.random_project is ORIGINAL and dattri_projection.random_project is ORIGINAL
    with pytest.raises(RuntimeError, match="boom"):
        with td.use_trak_fast():
            raise RuntimeError("boom")
    assert dattri_trak.random_project is ORIGINAL and dattri_projection.random_project is ORIGINAL


# ---- dattri's TRAKAttributor with and without trak_fast ----------------------------------

@pytest.fixture(scope="module")
def digits_task():
    xtr, ytr, xte, yte = load_digits(n_train=300, n_targets=40)
    model = train(make_mlp(hidden=32), xtr, ytr, epochs=10)

    def loss_f(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def prob_f(params, data):
        return torch.exp(-loss_f(params, data))

    return model, loss_f, prob_f, (xtr, ytr, xte, yte)


def dattri_scores(digits_task, seed, proj_type="rademacher", ours=False):
    model, loss_f, prob_f, (xtr, ytr, xte, yte) = digits_task
    task = AttributionTask(loss_func=loss_f, model=model, checkpoints=model.state_dict())
    attributor = TRAKAttributor(task=task, correct_probability_func=prob_f, device="cpu",
                                projector_kwargs={"proj_dim": 100, "proj_seed": seed, "proj_type": proj_type,
                                                  "proj_max_batch_size": 32, "device": "cpu"})
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=100, shuffle=False)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=40, shuffle=False)
    if ours:
        with td.use_trak_fast():
            attributor.cache(train_loader)
            return attributor.attribute(test_loader)
    attributor.cache(train_loader)
    return attributor.attribute(test_loader)


def corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_trak_attributor_scores_agree_as_dattris_own_seeds_do(digits_task):
    """Scores with trak_fast's projector correlate with dattri's own as well as two of
    dattri's seeds correlate with each other (averaged over two pairs each, to 0.03: the
    correlations themselves vary by ~0.02 from seed to seed at this size)."""
    theirs = [dattri_scores(digits_task, s) for s in (0, 1, 2)]
    ours = [dattri_scores(digits_task, s, ours=True) for s in (0, 1)]
    assert dattri_trak.random_project is ORIGINAL
    own = (corr(theirs[0], theirs[1]) + corr(theirs[1], theirs[2])) / 2
    cross = (corr(ours[0], theirs[2]) + corr(ours[1], theirs[0])) / 2
    assert own > 0.2  # the setting is informative at all
    assert cross >= own - 0.03
    # sjlt, which dattri itself only offers on CUDA, runs on the CPU through the drop-in.
    sparse = dattri_scores(digits_task, 0, proj_type="sjlt", ours=True)
    assert corr(sparse, theirs[0]) >= own - 0.1
