"""trak_fast.Projector: settings, seed derivation for ensembles, input forms, errors."""
import copy
import json
import pickle

import pytest
import torch

from trak_fast import model_seed, project, projection_matrix
from trak_fast.ops.projector import Projector

from conftest import DEVICES  # noqa: E402


def reference(flat, proj_dim, seed, kind="rademacher", scale=None):
    """float64 oracle: flat @ P, P materialized (scale defaults to 1/sqrt(k))."""
    p = projection_matrix(flat.shape[1], proj_dim, seed=seed, kind=kind, dtype=torch.float64,
                          device=flat.device, scale=scale)
    return flat.double() @ p


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("scale", [None, 1.0, 0.25])
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_sequence_and_dict_match_oracle(kind, scale, device):
    a, b = torch.randn(4, 3, 7, device=device), torch.randn(4, 5, device=device)
    flat = torch.cat([a.reshape(4, -1), b], dim=1)
    proj = Projector(90, seed=12, kind=kind, scale=scale)
    expected = reference(flat, 90, 12, kind, scale)
    for grads in (flat, [a, b], (a, b), {"a": a, "b": b}):
        out = proj(grads)
        assert out.shape == (4, 90) and out.dtype == torch.float32 and out.device.type == device
        assert rel_err(out, expected) < 1e-5


def test_default_scale_preserves_norm_in_expectation():
    """scale=None is 1/sqrt(k): E ||proj(g)||^2 = ||g||^2."""
    g = torch.randn(1, 2000, dtype=torch.float64)
    ratios = torch.tensor([(Projector(64, seed=s)(g).norm() ** 2 / g.norm() ** 2).item() for s in range(100)])
    # Each ratio is ~ chi^2_64 / 64-like (sd <= 0.18); the mean of 100 has sd <= 0.018.
    assert abs(ratios.mean().item() - 1) < 0.08


def test_equals_the_project_function():
    g = torch.randn(3, 500)
    proj = Projector(33, seed=4, kind="gaussian", scale=2.0)
    assert torch.equal(proj(g), project(g, 33, seed=4, kind="gaussian", scale=2.0))


def test_model_id_uses_model_seed():
    g = torch.randn(3, 200)
    proj = Projector(40, seed=9)
    assert proj.seed_for(model_id=5) == model_seed(9, 5)
    assert rel_err(proj(g, model_id=5), reference(g, 40, model_seed(9, 5))) < 1e-5
    assert not torch.equal(proj(g, model_id=5), proj(g, model_id=6))


def test_seed_offset_adds_to_seed():
    g = torch.randn(3, 200)
    proj = Projector(40, seed=9)
    assert proj.seed_for(seed_offset=10_000) == 10_009
    assert torch.equal(proj(g, seed_offset=10_000), Projector(40, seed=10_009)(g))
    assert proj.seed_for() == 9


def test_feature_offset_and_out_compose():
    a, b = torch.randn(5, 60), torch.randn(5, 40)
    proj = Projector(25, seed=1)
    out = proj(a, model_id=2)
    returned = proj(b, model_id=2, feature_offset=60, out=out)
    assert returned is out
    assert rel_err(out, proj(torch.cat([a, b], dim=1), model_id=2)) < 1e-5


def test_matrix_is_what_call_applies():
    g = torch.randn(4, 150, dtype=torch.float64)
    proj = Projector(20, seed=3, kind="gaussian")
    m = proj.matrix(150, model_id=1, dtype=torch.float64)
    assert m.shape == (150, 20)
    assert rel_err(proj(g, model_id=1), g @ m) < 1e-12


def test_immutable_hashable_serializable():
    proj = Projector(128, seed=2, kind="gaussian", precision="tf32", scale=1.0)
    with pytest.raises(AttributeError, match="immutable"):
        proj.proj_dim = 3
    assert proj == Projector(**json.loads(json.dumps(proj.to_dict())))
    assert proj == pickle.loads(pickle.dumps(proj)) == copy.deepcopy(proj)
    assert len({proj, Projector(128, seed=2, kind="gaussian", precision="tf32", scale=1.0)}) == 1
    assert proj != Projector(128, seed=3, kind="gaussian", precision="tf32", scale=1.0)
    assert proj.replace(proj_dim=64) == Projector(64, seed=2, kind="gaussian", precision="tf32", scale=1.0)
    assert "proj_dim=128" in repr(proj)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"proj_dim": 0}, ValueError, "proj_dim must be in"),
    ({"proj_dim": 8.0}, TypeError, "proj_dim must be an int"),
    ({"proj_dim": 8, "seed": -1}, ValueError, "seed must be in"),
    ({"proj_dim": 8, "kind": "normal"}, ValueError, "kind must be one of"),
    ({"proj_dim": 8, "precision": "fp16"}, ValueError, "precision must be one of"),
    ({"proj_dim": 8, "scale": "1"}, TypeError, "scale must be a real number"),
])
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        Projector(**kwargs)


def test_bad_call_arguments():
    proj = Projector(8, seed=2**63 - 2)
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="model_id or seed_offset, not both"):
        proj(g, model_id=1, seed_offset=1)
    with pytest.raises(TypeError, match="model_id must be an int"):
        proj(g, model_id="1")
    with pytest.raises(ValueError, match="seed \\+ seed_offset must be below 2\\*\\*63"):
        proj(g, seed_offset=5)
    with pytest.raises(ValueError, match=r"grads\['b'\] has batch size 1, expected 2"):
        proj({"a": g, "b": torch.randn(1, 3)})
    with pytest.raises(ValueError, match="empty dict"):
        proj({})
    with pytest.raises(TypeError, match="unknown settings"):
        proj.replace(dim=3)


def test_settings_reach_the_project_call(monkeypatch):
    """precision only changes CUDA arithmetic, so on the CPU it is checked by what is passed."""
    import trak_fast.ops.projector as projector_module

    seen = {}

    def spy(grads, proj_dim, **kwargs):
        seen.update(kwargs, proj_dim=proj_dim)
        return project(grads, proj_dim, **kwargs)

    monkeypatch.setattr(projector_module, "project", spy)
    Projector(16, seed=1, kind="gaussian", precision="bf16", scale=0.5)(torch.randn(2, 10), model_id=3)
    assert seen == {"proj_dim": 16, "seed": model_seed(1, 3), "kind": "gaussian", "feature_offset": 0,
                    "out": None, "precision": "bf16", "scale": 0.5, "nnz": 4}
