"""TrakFastProjector: the contract TRAKer(projector=...) relies on, checked piece by piece.

The end-to-end TRAKer runs are in test_compat_traker.py.
"""
import json
import subprocess
import sys

import pytest
import torch

from trak_fast import model_seed, projection_matrix
from trak_fast.compat.trak import TrakFastProjector

import trak.projectors as trak_projectors  # noqa: E402  (traker==0.3.2 is a test dependency)

from conftest import DEVICES  # noqa: E402


def grad_dict(batch=5, device="cpu", dtype=torch.float32, seed=0):
    """Per-parameter gradients shaped like trak's FunctionalGradientComputer output."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (16, 8), "0.bias": (16,), "2.weight": (3, 16), "2.bias": (3,), "scalar": ()}
    return {k: torch.randn((batch, *s), generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}


def vectorized(grads):
    """[B, p] float64: trak's `vectorize` order (each piece flattened per example, in dict order)."""
    return torch.cat([g.reshape(g.shape[0], -1).double() for g in grads.values()], dim=1)


GRAD_DIM = 16 * 8 + 16 + 3 * 16 + 3 + 1


def reference(flat, proj_dim, seed, model_id, kind="rademacher"):
    """float64 oracle: unscaled matrix of seed model_seed(seed, model_id)."""
    r = projection_matrix(flat.shape[1], proj_dim, seed=model_seed(seed, model_id), kind=kind,
                          dtype=torch.float64, device=flat.device, scale=1.0)
    return flat @ r


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_is_a_trak_projector_with_its_attributes():
    p = TrakFastProjector(GRAD_DIM, 96, 4, "normal", "cpu")
    assert isinstance(p, trak_projectors.AbstractProjector)
    assert (p.grad_dim, p.proj_dim, p.seed, p.proj_type, p.device) == (GRAD_DIM, 96, 4, "normal", torch.device("cpu"))
    # TRAKer writes proj_type into metadata.json and compares it to trak's enum on resume.
    assert json.loads(json.dumps({"JL matrix type": p.proj_type})) == {"JL matrix type": "normal"}
    assert p.proj_type == trak_projectors.ProjectionType.normal


@pytest.mark.parametrize("proj_type,kind", [("rademacher", "rademacher"), ("normal", "gaussian")])
@pytest.mark.parametrize("device", DEVICES)
def test_dict_and_tensor_match_unscaled_float64_oracle(proj_type, kind, device):
    grads = grad_dict(device=device)
    p = TrakFastProjector(GRAD_DIM, 130, 11, proj_type, device)
    expected = reference(vectorized(grads), 130, 11, model_id=2, kind=kind)
    from_dict = p.project(grads, model_id=2)
    from_tensor = p.project(vectorized(grads).float(), model_id=2)
    assert from_dict.shape == (5, 130) and from_dict.dtype == torch.float32
    assert from_dict.device.type == device
    assert rel_err(from_dict, expected) < 1e-5
    assert rel_err(from_tensor, expected) < 1e-5


def test_proj_type_enum_is_accepted_and_stored_as_string():
    p = TrakFastProjector(GRAD_DIM, 8, 0, trak_projectors.ProjectionType.rademacher, "cpu")
    assert type(p.proj_type) is str and p.proj_type == "rademacher"


def test_each_model_id_has_its_own_matrix_and_it_is_reproducible():
    grads = grad_dict()
    p = TrakFastProjector(GRAD_DIM, 64, 0, "rademacher", "cpu")
    a0, a1, a0_again = p.project(grads, 0), p.project(grads, 1), p.project(grads, 0)
    assert torch.equal(a0, a0_again)
    # Independent +-1 matrices: the two projections are nearly uncorrelated (|r| ~ 1/sqrt(5*64)).
    r = torch.corrcoef(torch.stack([a0.flatten(), a1.flatten()]))[0, 1].item()
    assert abs(r) < 0.3
    # A fresh projector with the same seed rebuilds the same features (resuming a TRAK run).
    assert torch.equal(TrakFastProjector(GRAD_DIM, 64, 0, "rademacher", "cpu").project(grads, 1), a1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_gradients(dtype, device):
    grads = grad_dict(device=device, dtype=dtype)
    out = TrakFastProjector(GRAD_DIM, 48, 3, "rademacher", device).project(grads, 0)
    assert out.dtype == torch.float32
    # The oracle sees the same rounded inputs, so only fp32 accumulation differs.
    assert rel_err(out, reference(vectorized(grads), 48, 3, 0)) < 1e-5


def test_dtype_argument_sets_output_dtype():
    grads = grad_dict()
    out = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu", dtype=torch.float16).project(grads, 0)
    assert out.dtype == torch.float16
    # Same values as the float32 result, rounded once to float16.
    assert rel_err(out.float(), reference(vectorized(grads), 16, 0, 0)) < 1e-3


def test_unscaled_magnitude_matches_trak_basic_projector():
    """E ||R^T g||^2 = k ||g||^2 for unscaled entries: both projectors, averaged over seeds."""
    g = torch.randn(1, 500, generator=torch.Generator().manual_seed(0))
    k, seeds = 64, range(60)
    ours = torch.tensor([
        (TrakFastProjector(500, k, s, "rademacher", "cpu").project(g, 0).norm() ** 2).item() for s in seeds
    ]) / (k * g.norm() ** 2)
    basic = torch.tensor([
        (trak_projectors.BasicProjector(500, k, s, trak_projectors.ProjectionType.rademacher, "cpu")
         .project(g, 0).norm() ** 2).item() for s in seeds
    ]) / (k * g.norm() ** 2)
    # Each ratio is ~ chi^2_k / k-like with sd <= sqrt(2/64) = 0.18; a mean of 60 has sd <= 0.023.
    assert abs(ours.mean().item() - 1) < 0.1
    assert abs(basic.mean().item() - 1) < 0.1


def test_gradients_on_another_device_are_moved():
    p = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "meta")
    # The meta device runs no arithmetic: only the placement and shape are checked here.
    out = p.project(grad_dict(), 0)
    assert out.device.type == "meta" and out.shape == (5, 16)


def test_free_memory_keeps_the_projector_usable():
    p = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu")
    before = p.project(grad_dict(), 3)
    p.free_memory()
    assert torch.equal(p.project(grad_dict(), 3), before)


def test_max_batch_size_is_accepted_and_changes_nothing():
    grads = grad_dict(batch=40)
    a = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu", max_batch_size=8).project(grads, 0)
    b = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu").project(grads, 0)
    assert torch.equal(a, b)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("proj_type", ["gaussian", "Rademacher", "sparse", 3, None])
def test_unknown_proj_type(proj_type):
    with pytest.raises(ValueError, match="proj_type must be one of"):
        TrakFastProjector(GRAD_DIM, 16, 0, proj_type, "cpu")


@pytest.mark.parametrize("model_id", [1.0, "0", None, True])
def test_model_id_must_be_an_int(model_id):
    p = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu")
    with pytest.raises(TypeError, match="model_id must be an int"):
        p.project(grad_dict(), model_id)


def test_model_id_numpy_int_is_accepted():
    np = pytest.importorskip("numpy")
    p = TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu")
    assert torch.equal(p.project(grad_dict(), np.int64(2)), p.project(grad_dict(), 2))


def test_negative_model_id():
    with pytest.raises(ValueError, match="model_id must be in"):
        TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu").project(grad_dict(), -1)


def test_dict_with_mismatched_batch_sizes_names_the_parameter():
    grads = grad_dict()
    grads["2.bias"] = grads["2.bias"][:3]
    with pytest.raises(ValueError, match=r"grads\['2.bias'\] has batch size 3, expected 5"):
        TrakFastProjector(GRAD_DIM, 16, 0, "rademacher", "cpu").project(grads, 0)


def test_wrong_grad_dim():
    with pytest.raises(ValueError, match=f"grads hold {GRAD_DIM} entries per example, expected grad_dim=10"):
        TrakFastProjector(10, 16, 0, "rademacher", "cpu").project(grad_dict(), 0)


@pytest.mark.parametrize("grads,error", [
    ({}, ValueError), (torch.randn(2, 3, 4), ValueError), ([torch.randn(2, 3)], TypeError),
    ({"w": torch.ones(2, 3, dtype=torch.int64)}, TypeError),
])
def test_other_bad_grads(grads, error):
    with pytest.raises(error, match="grads"):
        TrakFastProjector(3, 16, 0, "rademacher", "cpu").project(grads, 0)


@pytest.mark.parametrize("kwargs,match", [
    ({"grad_dim": 0}, "grad_dim must be in"), ({"proj_dim": 2.0}, "proj_dim must be an int"),
    ({"seed": -1}, "seed must be in"), ({"max_batch_size": 0}, "max_batch_size must be in"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(grad_dim=GRAD_DIM, proj_dim=16, seed=0, proj_type="rademacher", device="cpu")
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        TrakFastProjector(**args)


def test_works_without_trak_installed():
    """With `import trak` failing, the class stands alone (and is not an AbstractProjector)."""
    code = (
        "import sys; sys.modules['trak'] = None; sys.modules['trak.projectors'] = None\n"
        "import torch\n"
        "from trak_fast.compat.trak import TrakFastProjector\n"
        "p = TrakFastProjector(6, 4, 0, 'rademacher', 'cpu')\n"
        "assert TrakFastProjector.__mro__[1] is object\n"
        "out = p.project({'w': torch.ones(2, 2, 3)}, 0)\n"
        "assert out.shape == (2, 4)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
