"""trak_fast.compat.fast_jl: fast_jl's six functions, checked against the unscaled float64 oracle."""
import pytest
import torch

import trak_fast.compat.fast_jl as fast_jl
from trak_fast import projection_matrix

from conftest import DEVICES  # noqa: E402
FUNCTIONS = [(f"project_{name}_{b}", kind) for name, kind in [("rademacher", "rademacher"), ("normal", "gaussian")]
             for b in (8, 16, 32)]


def reference(x, n_out, seed, kind):
    """float64: x @ R with unscaled entries (+-1 or N(0, 1))."""
    r = projection_matrix(x.shape[1], n_out, seed=seed, kind=kind, dtype=torch.float64, device=x.device, scale=1.0)
    return x.double() @ r


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_module_exports_the_six_functions():
    assert sorted(fast_jl.__all__) == sorted(name for name, _ in FUNCTIONS)


@pytest.mark.parametrize("name,kind", FUNCTIONS)
@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (3, 1000, 100), (40, 257, 700)])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_unscaled_oracle_for_any_batch_and_dim(name, kind, batch, n_in, n_out, device):
    x = torch.randn(batch, n_in, device=device)
    out = getattr(fast_jl, name)(x, n_out, 5, 108)
    assert out.shape == (batch, n_out) and out.dtype == torch.float32 and out.device.type == device
    assert rel_err(out, reference(x, n_out, 5, kind)) < 1e-5


def test_batch_template_suffix_does_not_change_values():
    x = torch.randn(50, 300)
    for prefix in ("project_rademacher", "project_normal"):
        outs = [getattr(fast_jl, f"{prefix}_{b}")(x, 64, 1, 108) for b in (8, 16, 32)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_num_feature_tiles_is_ignored():
    """fast_jl's matrix changed with the SM count; this one must not."""
    x = torch.randn(4, 999)
    ref = fast_jl.project_rademacher_8(x, 512, 0, 108)
    for tiles in (0, 1, 46, 132):
        assert torch.equal(fast_jl.project_rademacher_8(x, 512, 0, tiles), ref)


def test_seed_selects_the_matrix():
    x = torch.randn(8, 400)
    a, b = fast_jl.project_normal_8(x, 256, 0, 1), fast_jl.project_normal_8(x, 256, 1, 1)
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(r) < 0.2  # independent matrices: |r| ~ 1/sqrt(2048)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_give_float32(dtype):
    x = torch.randn(6, 300).to(dtype)
    out = fast_jl.project_rademacher_16(x, 96, 2, 1)
    assert out.dtype == torch.float32
    assert rel_err(out, reference(x, 96, 2, "rademacher")) < 1e-5


def test_non_contiguous_input():
    x = torch.randn(300, 6).t()
    assert rel_err(fast_jl.project_normal_32(x, 50, 9, 1), reference(x, 50, 9, "gaussian")) < 1e-5


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(2, 3, 4), 8, 0, 1), ValueError, "input must be a 2-D tensor"),
    ((torch.ones(2, 3, dtype=torch.int32), 8, 0, 1), TypeError, "input must be float16"),
    (([[1.0, 2.0]], 8, 0, 1), TypeError, "input must be a tensor"),
    ((torch.randn(2, 3), 0, 0, 1), ValueError, "N must be in"),
    ((torch.randn(2, 3), 8.0, 0, 1), TypeError, "N must be an int"),
    ((torch.randn(2, 3), 8, -1, 1), ValueError, "seed must be in"),
    ((torch.randn(2, 3), 8, 0, "108"), TypeError, "num_feature_tiles must be an int"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fast_jl.project_rademacher_8(*args)
