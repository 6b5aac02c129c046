"""Per-layer features and the block-diagonal kernel, against float64 references."""
import hashlib
import json

import pytest
import torch
from torch import nn

from trak_fast import TRAK, Featurizer, StoreMismatchError, attribute, featurize
from trak_fast.eval import digits
from trak_fast import model_seed, projection_matrix
from trak_fast.features.layout import per_layer_dims

N, T = 40, 5


@pytest.fixture(scope="module")
def data():
    x, y, xt, yt = digits.load_digits(N, T)
    return x, y, xt, yt


def _name_seed(seed, name):
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return model_seed(seed, h & (2**63 - 1))


def deep_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


def test_per_layer_dims_rule():
    dims = per_layer_dims({"a": 10_000, "b": 100, "c": 2_500}, 512)
    assert sum(dims.values()) == 512
    assert min(dims.values()) >= 32                     # k_min = min(32, 512 // 6)
    assert dims["a"] > dims["c"] > dims["b"]             # grows with the size, sublinearly
    assert dims["a"] / dims["c"] < 10_000 / 2_500
    assert sum(per_layer_dims({"a": 5, "b": 7}, 3).values()) == 3
    with pytest.raises(ValueError, match="proj_dim >= the number of layers"):
        per_layer_dims({"a": 5, "b": 7, "c": 1}, 2)


def test_per_layer_projection_equals_reference(data):
    x, y, _, _ = data
    model = deep_mlp()
    sd = model.state_dict()
    batches = digits.batches(x, y, 16)
    f = Featurizer(model, sd, proj_dim=96, projection="per_layer", seed=4, model_id=1)
    assert [b.layer for b in f.layout] == ["0", "2", "4"] and f.layout[-1].stop == 96
    phi = featurize(model, sd, batches, proj_dim=96, projection="per_layer", seed=4, model_id=1)
    assert [b.name for b in phi.layout] == ["0", "2", "4"]
    raw = featurize(model, sd, batches, proj_dim=None, gradients="vmap").phi.double()
    seed = model_seed(4, 1)
    expected, column = [], 0
    for block in f.layout:
        width = sum(p.numel() for n, p in model.named_parameters() if n.startswith(block.layer + "."))
        p_l = projection_matrix(width, block.stop - block.start,
                                seed=_name_seed(seed, block.layer), dtype=torch.float64)
        expected.append(raw[:, column:column + width] @ p_l)
        column += width
    torch.testing.assert_close(phi.phi.double(), torch.cat(expected, 1), rtol=1e-4, atol=1e-6)


def _direct_block_scores(phi, q, t, blocks, lam_rel):
    """float64: sum over blocks of Phi_l (Phi_l^T Phi_l + lam_l I)^-1 T_l^T, solved directly."""
    phi, t = phi.double(), t.double()
    s = 0
    for a, b in blocks:
        p_l, t_l = phi[:, a:b], t[:, a:b]
        k_l = p_l.T @ p_l
        lam = lam_rel * torch.trace(k_l) / phi.shape[0]
        s = s + p_l @ torch.linalg.solve(k_l + lam * torch.eye(b - a, dtype=torch.float64), t_l.T)
    return s


@pytest.mark.parametrize("settings", [
    dict(proj_dim=None),                                   # raw: blocks are layers' parameters
    dict(proj_dim=128, projection="per_layer"),
    dict(projection="factored", factored_dims=(4, 4)),     # 0.weight: 16 features < n, etc.
    dict(projection="factored", factored_dims=(16, 8)),    # a block with k_l > n: dual form
])
def test_block_kernel_equals_direct_solve(data, settings):
    x, y, xt, yt = data
    model = deep_mlp()
    checkpoints = [deep_mlp(s).state_dict() for s in range(2)]
    train, targets = digits.batches(x, y, 16), digits.batches(xt, yt)
    got = attribute(model, checkpoints, train, targets, kernel="per_layer", lambda_reg=2.0,
                    kernel_weights="none", progress=False, **settings)
    s_sum, q_sum = 0, 0
    for model_id, sd in enumerate(checkpoints):
        f = featurize(model, sd, train, model_id=model_id, **settings)
        t = featurize(model, sd, targets, model_id=model_id, out_to_loss=False, **settings).phi
        layers = {}
        for block in f.layout:
            start, _ = layers.get(block.layer, (block.start, None))
            layers[block.layer] = (start, block.stop)
        s_sum = s_sum + _direct_block_scores(f.phi, f.out_to_loss, t, list(layers.values()), 2.0)
        q_sum = q_sum + f.out_to_loss.double()
    expected = (s_sum / 2) * (q_sum / 2)[:, None]
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=1e-7)
    full = attribute(model, checkpoints, train, targets, kernel="full", lambda_reg=2.0,
                     kernel_weights="none", progress=False, **settings)
    assert not torch.allclose(full, got, rtol=1e-2), "per_layer must differ from the full kernel"


def test_per_layer_kernel_refuses_a_dense_layout(data):
    x, y, xt, yt = data
    model = deep_mlp()
    with pytest.raises(ValueError, match="kernel='per_layer' needs features laid out by layer"):
        attribute(model, [model.state_dict()], digits.batches(x, y), digits.batches(xt, yt),
                  proj_dim=32, kernel="per_layer", progress=False)
    with pytest.raises(ValueError, match="kernel must be one of"):
        attribute(model, [model.state_dict()], digits.batches(x, y), digits.batches(xt, yt),
                  proj_dim=32, kernel="blocks", progress=False)
    with pytest.raises(ValueError, match="ensemble='trak'"):
        attribute(model, [model.state_dict()], digits.batches(x, y), digits.batches(xt, yt),
                  proj_dim=None, kernel="per_layer", ensemble="trak", progress=False)


def test_store_layout_round_trip_and_per_layer_scores(data, tmp_path):
    x, y, xt, yt = data
    model = deep_mlp()
    checkpoints = [deep_mlp(s).state_dict() for s in range(2)]
    train, targets = digits.batches(x, y, 16), digits.batches(xt, yt)
    settings = dict(proj_dim=96, projection="per_layer")
    trak = TRAK(tmp_path, model, train_size=N, progress=False, **settings)
    stored = json.loads((tmp_path / "metadata.json").read_text())["settings"]["layout"]
    expected = Featurizer(model, checkpoints[0], **settings).layout
    assert [tuple(b) for b in stored] == [tuple(b) for b in expected]
    for model_id, sd in enumerate(checkpoints):
        trak.featurize(sd, train, model_id=model_id)
    trak.finalize(kernel="full")
    for model_id, sd in enumerate(checkpoints):
        trak.featurize_targets("t", sd, targets, model_id=model_id)
    on_the_fly = torch.from_numpy(trak.score("t", kernel="per_layer").copy())   # not finalized
    trak.finalize(kernel="per_layer")
    files = sorted(p.name for p in (tmp_path / "model_0").glob("kernel_per_layer_*.npy"))
    assert files == [f"kernel_per_layer_out_to_loss_{i}.npy" for i in range(3)]
    per_layer = torch.from_numpy(trak.score("t", kernel="per_layer", overwrite=True).copy())
    torch.testing.assert_close(per_layer, on_the_fly)
    full = torch.from_numpy(trak.score("t", kernel="full", overwrite=True).copy())
    torch.testing.assert_close(per_layer, attribute(model, checkpoints, train, targets,
                                                    kernel="per_layer", progress=False, **settings),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(full, attribute(model, checkpoints, train, targets,
                                               progress=False, **settings), rtol=1e-4, atol=1e-7)


def test_store_refuses_another_layout(data, tmp_path):
    TRAK(tmp_path, deep_mlp(), train_size=N, proj_dim=96, projection="per_layer")
    # Same parameter count and proj_dim, other layers: the layout differs.
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                          nn.Linear(16, 10))
    other[2] = nn.Linear(24, 16)
    TRAK(tmp_path, other, train_size=N, proj_dim=96, projection="per_layer")     # same: fine
    renamed = nn.Sequential()
    renamed.add_module("first", nn.Linear(64, 24))
    renamed.add_module("act", nn.ReLU())
    renamed.add_module("second", nn.Linear(24, 16))
    renamed.add_module("act2", nn.ReLU())
    renamed.add_module("third", nn.Linear(16, 10))
    with pytest.raises(StoreMismatchError, match="layout"):
        TRAK(tmp_path, renamed, train_size=N, proj_dim=96, projection="per_layer")


def _direct_weighted(phi, t, w, lam_rel):
    phi, t = phi.double(), t.double()
    k = phi.T @ (w[:, None] * phi)
    lam = lam_rel * torch.trace(k) / phi.shape[0]
    return phi @ torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=torch.float64), t.T)


@pytest.mark.parametrize("proj_dim", [16, 64])               # primal (k < n) and dual (k > n)
@pytest.mark.parametrize("kernel_weights", ["out_to_loss", "fisher"])
def test_weighted_kernel_equals_direct_solve(data, proj_dim, kernel_weights, tmp_path):
    x, y, xt, yt = data
    model = deep_mlp()
    checkpoints = [deep_mlp(s).state_dict() for s in range(2)]
    train, targets = digits.batches(x, y, 16), digits.batches(xt, yt)
    got = attribute(model, checkpoints, train, targets, proj_dim=proj_dim, lambda_reg=0.5,
                    kernel_weights=kernel_weights, progress=False)
    s_sum, q_sum = 0, 0
    for model_id, sd in enumerate(checkpoints):
        f = featurize(model, sd, train, proj_dim=proj_dim, model_id=model_id)
        t = featurize(model, sd, targets, proj_dim=proj_dim, model_id=model_id, out_to_loss=False).phi
        q = f.out_to_loss.double()
        w = q if kernel_weights == "out_to_loss" else q * q
        s_sum = s_sum + _direct_weighted(f.phi, t, w, 0.5)
        q_sum = q_sum + q
    expected = (s_sum / 2) * (q_sum / 2)[:, None]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-8)
    trak = TRAK(tmp_path, model, train_size=N, proj_dim=proj_dim, progress=False)
    for model_id, sd in enumerate(checkpoints):
        trak.featurize(sd, train, model_id=model_id)
    trak.finalize(kernel_weights="none")
    for model_id, sd in enumerate(checkpoints):
        trak.featurize_targets("t", sd, targets, model_id=model_id)
    on_the_fly = trak.score("t", lambda_reg=0.5, kernel_weights=kernel_weights)   # not finalized
    torch.testing.assert_close(torch.from_numpy(on_the_fly.copy()).double(), expected,
                               rtol=1e-4, atol=1e-8)
    trak.finalize(kernel_weights=kernel_weights)
    stored = trak.score("t", lambda_reg=0.5, kernel_weights=kernel_weights, overwrite=True)
    torch.testing.assert_close(torch.from_numpy(stored.copy()).double(), expected,
                               rtol=1e-4, atol=1e-8)


def test_kernel_weights_errors(data):
    x, y, xt, yt = data
    model = deep_mlp()
    args = (model, [model.state_dict()], digits.batches(x, y), digits.batches(xt, yt))
    with pytest.raises(ValueError, match="kernel_weights must be one of"):
        attribute(*args, proj_dim=8, kernel_weights="Q", progress=False)
    with pytest.raises(ValueError, match="ensemble='trak'"):
        attribute(*args, proj_dim=8, kernel_weights="fisher", ensemble="trak", progress=False)
    xr = torch.randn(N, 3)
    with pytest.raises(ValueError, match="needs Q >= 0"):
        attribute(nn.Linear(3, 1), [nn.Linear(3, 1).state_dict()], [(xr, torch.randn(N))],
                  [(xr[:2], torch.randn(2))], task="regression", proj_dim=None,
                  kernel_weights="out_to_loss", progress=False)
