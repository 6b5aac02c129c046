"""Settings objects, keyword calls, the 0.1 module paths, and stores written before the move."""
import dataclasses
import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trak_fast
from trak_fast import TRAK, FeatureSettings, ScoreSettings, attribute
from trak_fast.eval import digits

DATA = Path(__file__).parent / "data" / "store_v0.1"


@pytest.fixture(scope="module")
def problem():
    x, y, xt, yt = digits.load_digits(60, 8, split_seed=1)
    model = digits.make_mlp(8, seed=2)
    ckpts = [{k: v.clone() for k, v in digits.train(digits.make_mlp(8, seed=s), x, y, epochs=2,
                                                      seed=s).state_dict().items()} for s in (0, 1)]
    return model, ckpts, digits.batches(x, y, 20), digits.batches(xt, yt, 8)


def test_objects_and_keywords_give_the_same_scores(problem):
    model, ckpts, train, targets = problem
    by_keyword = attribute(model, ckpts, train, targets, proj_dim=32, seed=3, kind="gaussian",
                           lambda_reg=0.5, kernel_weights="fisher", progress=False)
    by_object = attribute(model, ckpts, train, targets, progress=False,
                          features=FeatureSettings(proj_dim=32, seed=3, kind="gaussian"),
                          scoring=ScoreSettings(lambda_reg=0.5, kernel_weights="fisher"))
    assert torch.equal(by_keyword, by_object)
    # A keyword overrides the object's field.
    mixed = attribute(model, ckpts, train, targets, progress=False, seed=3,
                      features=FeatureSettings(proj_dim=32, seed=99, kind="gaussian"),
                      scoring=ScoreSettings(lambda_reg=0.5, kernel_weights="fisher"))
    assert torch.equal(mixed, by_keyword)


def test_unknown_keyword_and_wrong_object_are_named(problem):
    model, ckpts, train, targets = problem
    with pytest.raises(TypeError, match=r"attribute\(\) got unexpected keyword argument\(s\) \['proj_dims'\]"):
        attribute(model, ckpts, train, targets, proj_dims=32)
    with pytest.raises(TypeError, match="features must be a FeatureSettings, got ScoreSettings"):
        attribute(model, ckpts, train, targets, features=ScoreSettings())
    with pytest.raises(TypeError, match=r"TRAK.score\(\) got unexpected keyword argument\(s\) \['proj_dim'\]"):
        TRAK.score(object.__new__(TRAK), "x", proj_dim=3)    # score takes score settings only


def test_settings_are_validated_once_and_frozen():
    s = FeatureSettings(projection="factored")
    assert s.factored_dims == (16, 16) and s.grad_wrt is None
    assert FeatureSettings(grad_wrt=["a", "b"]).grad_wrt == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.proj_dim = 3
    for bad, match in [(dict(proj_dim=0), "proj_dim must be an int"), (dict(kind="x"), "kind must be one of"),
                       (dict(seed=-1), r"seed must be in \[0"), (dict(nnz=0, kind="sparse"), "nnz"),
                       (dict(projection="sketch"), "projection must be one of"),
                       (dict(gradients="fast"), "gradients must be one of"),
                       (dict(factored_dims=(4, 4)), "only used with projection='factored'"),
                       (dict(projection="factored", factored_dims="big"), "or 'auto', got 'big'"),
                       (dict(projection="factored", gradients="vmap"), "needs the hook path"),
                       (dict(grad_wrt="fc.weight"), "list of parameter names"),
                       (dict(grad_memory=0), "grad_memory"), (dict(feature_dtype="int8"), "feature_dtype")]:
        with pytest.raises((ValueError, TypeError), match=match):
            FeatureSettings(**bad)
    assert ScoreSettings() == ScoreSettings(ensemble="mean", lambda_reg=3.0, relative_lambda=True,
                                            kernel="full", kernel_weights="out_to_loss")
    assert ScoreSettings(ensemble="trak").kernel_weights == "none"
    for bad, match in [(dict(ensemble="median"), "ensemble"), (dict(lambda_reg=-1.0), "lambda_reg"),
                       (dict(kernel="diag"), "kernel must be one of"),
                       (dict(kernel_weights="w"), "kernel_weights must be one of"),
                       (dict(ensemble="trak", kernel="per_layer"), "ensemble='trak'")]:
        with pytest.raises(ValueError, match=match):
            ScoreSettings(**bad)
    with pytest.raises(ValueError, match="projection='factored'"):
        ScoreSettings(ensemble="trak").check_features(FeatureSettings(projection="factored"))


def test_old_module_paths_still_import():
    import sys
    before = dict(sys.modules)
    for old, new in trak_fast.MOVED.items():
        assert importlib.import_module(f"trak_fast.{old}") is importlib.import_module(f"trak_fast.{new}")
    # No second copy of any module was made (its classes would differ from the package's).
    assert all(sys.modules[name] is module for name, module in before.items())
    import trak_fast.gradients.factored as old_path
    import trak_fast.features.gradients.factored as new_path
    assert old_path is new_path
    from trak_fast.featurize import Featurizer    # the 0.1 spelling
    assert Featurizer is trak_fast.Featurizer
    # The functions keep their names although modules of the same names were imported.
    assert callable(trak_fast.featurize) and callable(trak_fast.attribute)
    assert trak_fast.featurize.__module__ == "trak_fast.features.loop"


def test_store_written_by_0_1_opens_and_scores_the_same(tmp_path):
    """tests/data/store_v0.1 was written by trak_fast 0.1.0 (the flat package): it opens with
    the same settings, and scoring its stored features again gives its stored scores."""
    store = tmp_path / "store"
    shutil.copytree(DATA / "store", store)
    ckpt = torch.load(DATA / "checkpoint.pt")
    trak = TRAK(store, digits.make_mlp(8, seed=0), train_size=40, proj_dim=16, progress=False)
    assert trak.model_ids == [0]
    before = np.array(trak.load_scores("val"))
    again = trak.score("val", overwrite=True)
    np.testing.assert_allclose(again, before, rtol=1e-5, atol=1e-7)
    with pytest.raises(trak_fast.StoreMismatchError, match="proj_dim"):
        TRAK(store, digits.make_mlp(8, seed=0), train_size=40, proj_dim=32, progress=False)
    data = torch.load(DATA / "data.pt")
    trak.featurize_targets("val2", ckpt, digits.batches(data["xt"], data["yt"]), model_id=0)
    np.testing.assert_allclose(trak.score("val2"), before, rtol=1e-5, atol=1e-7)


def test_a_task_fills_only_what_the_caller_leaves_unset():
    from trak_fast.settings import split_options
    lm, cls = trak_fast.LanguageModelingTask(), trak_fast.ClassificationTask()
    # Classification has no preferences: the class defaults, as before.
    assert split_options({}, task=cls) == (FeatureSettings(), ScoreSettings())
    # Language modeling: factored, k x k from the model's width, and the per-layer Fisher.
    f, s = split_options({}, task=lm)
    assert (f.projection, f.factored_dims) == ("factored", "auto")
    assert (s.curvature, s.kernel, s.lambda_reg) == ("fisher", "per_layer", 0.01)
    # A projection keyword chooses the projection; the Fisher stays, over all columns of a
    # dense projection (one block), per layer otherwise.
    f, s = split_options({"proj_dim": 512}, task=lm)
    assert (f.projection, f.proj_dim, s.curvature, s.kernel) == ("dense", 512, "fisher", "full")
    f, s = split_options({"projection": "per_layer"}, task=lm)
    assert (f.projection, s.curvature, s.kernel) == ("per_layer", "fisher", "per_layer")
    # An estimator keyword chooses the estimator: TRAK's kernel with its own defaults.
    f, s = split_options({"kernel_weights": "none"}, task=lm)
    assert f.projection == "factored" and (s.curvature, s.kernel, s.lambda_reg) == ("kernel", "full", 3.0)
    # lambda_reg alone keeps the preferred estimator (it is relative either way).
    assert split_options({"lambda_reg": 0.2}, task=lm)[1].lambda_reg == 0.2
    # Objects passed whole are used as given.
    f, s = split_options({}, features=FeatureSettings(), scoring=ScoreSettings(), task=lm)
    assert (f, s) == (FeatureSettings(), ScoreSettings())


@pytest.mark.parametrize("width, k", [(16, 32), (64, 32), (80, 40), (96, 48), (768, 48)])
def test_auto_factored_dims_are_half_the_width_between_32_and_48(width, k):
    from transformers import GPT2Config, GPT2LMHeadModel
    from trak_fast.features.spec import FeatureSpec
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=width, n_layer=1,
                                       n_head=4, n_inner=3 * width))
    lm = trak_fast.LanguageModelingTask()
    auto = FeatureSpec(model, lm, FeatureSettings(projection="factored", factored_dims="auto"))
    assert auto.factored_dims == (k, k)
    # Every matrix layer's smaller side is the width (wte is [40, width]: 40 < width for the
    # widest models, a minority), so the median is the width.
    explicit = FeatureSpec(model, lm, FeatureSettings(projection="factored", factored_dims=(k, k)))
    assert [b for b in auto.layout] == [b for b in explicit.layout]


def test_auto_factored_features_equal_the_explicit_dims_they_resolve_to():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=8, n_embd=96, n_layer=1,
                                       n_head=4, n_inner=96, attn_implementation="eager"))
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.randint(0, 24, (3, 8))}
    got = trak_fast.featurize(model, ckpt, [batch], task="language_modeling", progress=False)
    want = trak_fast.featurize(model, ckpt, [batch], task="language_modeling",
                               projection="factored", factored_dims=(48, 48), progress=False)
    # 6 matrices (wte, wpe, c_attn, c_proj, c_fc, mlp c_proj), 4 biases, 3 LayerNorms
    assert got.phi.shape == (3, 6 * 48 * 48 + 10 * 48) and torch.equal(got.phi, want.phi)
    assert got.layout == want.layout


def test_trak_store_curvature_follows_the_task_and_can_be_chosen(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(9, 4), torch.nn.Linear(4, 9))
    lm = dict(task="language_modeling", train_size=4, progress=False)
    assert TRAK(tmp_path / "a", model, **lm).curvature == "fisher"
    assert TRAK(tmp_path / "b", model, curvature="kernel", **lm).curvature == "kernel"
    assert TRAK(tmp_path / "c", model, train_size=4, progress=False).curvature == "kernel"
    with pytest.raises(ValueError, match="curvature must be one of"):
        TRAK(tmp_path / "d", model, curvature="hessian", **lm)


def test_normalize_divides_each_score_by_the_norms_of_its_rows(problem, tmp_path):
    model, ckpts, train, targets = problem
    kw = dict(proj_dim=32, progress=False)
    plain = attribute(model, ckpts[:1], train, targets, **kw).double()
    phi = trak_fast.featurize(model, ckpts[0], train, **kw).phi.double()
    t = trak_fast.target_features(model, ckpts[0], targets, **kw).double()
    rows, cols = phi.norm(dim=1)[:, None], t.norm(dim=1)[None, :]
    for how, expected in (("train", plain / rows), ("targets", plain / cols),
                          ("both", plain / rows / cols)):
        got = attribute(model, ckpts[:1], train, targets, normalize=how, **kw).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7 * expected.abs().max().item())
    # The Fisher: the store gives attribute()'s normalized scores.
    fisher = dict(kw, curvature="fisher", normalize="both")
    want = attribute(model, ckpts[:1], train, targets, **fisher)
    store = TRAK(tmp_path, model, train_size=sum(len(b[1]) for b in train), proj_dim=32,
                 curvature="fisher", progress=False)
    store.featurize(ckpts[0], train, model_id=0)
    store.featurize_targets("t", ckpts[0], targets, model_id=0)
    got = torch.from_numpy(np.array(store.score("t", normalize="both")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(want, attribute(model, ckpts[:1], train, targets, proj_dim=32,
                                              curvature="fisher", progress=False))
    with pytest.raises(ValueError, match="normalize must be one of"):
        ScoreSettings(normalize="cosine")
