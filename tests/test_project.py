"""project() against the float64 oracle, its sequence form, out=, and its errors."""

import pytest
import torch

from trak_fast import project, projection_matrix

from conftest import DEVICES

KINDS = ["rademacher", "gaussian"]


def reference(g, k, **kw):
    """float64 ground truth: g @ P with P materialized by the oracle."""
    g = g.reshape(g.shape[0], -1).double()
    return g @ projection_matrix(g.shape[1], k, dtype=torch.float64, device=g.device, **kw)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,n,k", [(1, 1, 1), (7, 1023, 100), (16, 5000, 300), (3, 2100, 4100)])
def test_matches_float64_reference(kind, batch, n, k):
    g = torch.randn(batch, n)
    out = project(g, k, seed=7, kind=kind)
    assert out.shape == (batch, k) and out.dtype == torch.float32
    assert rel_err(out, reference(g, k, seed=7, kind=kind)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-13)])
def test_input_dtypes(dtype, tol):
    g = torch.randn(5, 777).to(dtype)
    out = project(g, 129, seed=3, kind="gaussian")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The reference sees the same rounded inputs, so only the accumulation differs.
    assert rel_err(out, reference(g, 129, seed=3, kind="gaussian")) < tol


def test_norm_preserved_in_expectation():
    """E ||P^T g||^2 = ||g||^2, for both kinds (averaged over seeds)."""
    g = torch.randn(1, 3000, dtype=torch.float64)
    for kind in KINDS:
        ratios = torch.tensor([
            (project(g, 64, seed=s, kind=kind).norm() ** 2 / g.norm() ** 2).item() for s in range(200)
        ])
        # Each ratio is ~ chi^2_64 / 64 (variance 2/64); the mean of 200 has sd 0.0125.
        assert abs(ratios.mean().item() - 1) < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_form_equals_concatenation(kind):
    a, b, c = torch.randn(6, 10, 30), torch.randn(6, 1), torch.randn(6, 4, 5, 6)
    whole = torch.cat([a.reshape(6, -1), b, c.reshape(6, -1)], dim=1)
    expected = reference(whole, 200, seed=1, kind=kind)
    for grads in ([a, b, c], (a, b, c), {"w": a, "b": b, "conv": c}):
        assert rel_err(project(grads, 200, seed=1, kind=kind), expected) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_feature_offset_composes(kind):
    a, b = torch.randn(4, 600), torch.randn(4, 900)
    k = 150
    out = project(a, k, seed=2, kind=kind)
    project(b, k, seed=2, kind=kind, feature_offset=600, out=out)
    assert rel_err(out, project([a, b], k, seed=2, kind=kind)) < 1e-6


def test_feature_offsets_beyond_2_32():
    g = torch.randn(3, 300)
    offset = 2**32 - 100  # the pieces straddle 2^32
    out = project([g[:, :150], g[:, 150:]], 64, feature_offset=offset, kind="gaussian")
    assert rel_err(out, reference(g, 64, feature_offset=offset, kind="gaussian")) < 1e-5
    far = project(g, 64, feature_offset=2**48)
    assert rel_err(far, reference(g, 64, feature_offset=2**48)) < 1e-5
    assert not torch.allclose(far, project(g, 64))


def test_out_adds_and_is_returned():
    g = torch.randn(4, 500)
    base = torch.randn(4, 32)
    out = base.clone()
    result = project(g, 32, out=out)
    assert result is out
    assert torch.allclose(out, base + project(g, 32), atol=1e-5)
    strided = torch.zeros(32, 4).T  # a non-contiguous out is honoured too
    project(g, 32, out=strided)
    assert torch.allclose(strided, project(g, 32), atol=1e-6)


def test_non_contiguous_inputs():
    base = torch.randn(900, 8)
    g = base.T  # [8, 900], column-major
    assert not g.is_contiguous()
    assert rel_err(project(g, 70), reference(g.contiguous(), 70)) < 1e-5
    sliced = torch.randn(8, 2000)[:, ::2]
    assert rel_err(project(sliced, 70), reference(sliced.contiguous(), 70)) < 1e-5
    piece = torch.randn(8, 10, 12).transpose(1, 2)
    assert rel_err(project([piece], 70), reference(piece.contiguous(), 70)) < 1e-5


def test_seeds_and_kinds_give_different_matrices():
    g = torch.randn(2, 400)
    outs = [project(g, 50, seed=s, kind=k) for s in (0, 1) for k in KINDS]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_empty_piece_and_mixed_dtypes(device):
    out = project(torch.randn(0, 10, device=device), 5)
    assert out.shape == (0, 5) and out.device.type == device
    g = torch.randn(5, 300, device=device)
    with_empty = project([torch.randn(5, 0, device=device), g], 64, seed=1)
    assert torch.equal(with_empty, project(g, 64, seed=1))
    mixed = project([torch.randn(3, 10, device=device),
                     torch.randn(3, 10, dtype=torch.float64, device=device)], 5)
    assert mixed.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    g = torch.randn(3, 100, device=device)
    g[1, 5] = float("nan")
    g[2, 7] = float("inf")
    out = project(g, 16)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all()
    assert (~torch.isfinite(out[2])).all()


def test_deterministic():
    g = torch.randn(9, 3000)
    assert torch.equal(project(g, 333, kind="gaussian"), project(g, 333, kind="gaussian"))


def test_not_differentiable():
    g = torch.randn(2, 10, requires_grad=True)
    out = project(g, 4)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="not differentiable"):
        project(g, 4, out=torch.zeros(2, 4)).sum().backward()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: project(torch.randint(0, 3, (2, 5)), 4), TypeError, "float16, bfloat16, float32 or float64"),
        (lambda: project(torch.ones(2, 5, dtype=torch.bool), 4), TypeError, "grads\\[0\\]"),
        (lambda: project(torch.ones(2, 5, dtype=torch.complex64), 4), TypeError, "complex64"),
        (lambda: project(torch.ones(2, 5, 3), 4), ValueError, "2-D tensor"),
        (lambda: project(torch.ones(5), 4), ValueError, "2-D tensor"),
        (lambda: project([], 4), ValueError, "empty"),
        (lambda: project([torch.ones(2, 5), torch.ones(3, 5)], 4), ValueError, "grads\\[1\\] has batch size 3, expected 2"),
        (lambda: project([torch.ones(2, 5), torch.ones(2, 5, device="meta")], 4), ValueError, "grads\\[1\\] is on meta"),
        (lambda: project(torch.ones(2, 5), 0), ValueError, "proj_dim"),
        (lambda: project(torch.ones(2, 5), -3), ValueError, "proj_dim"),
        (lambda: project(torch.ones(2, 5), 4.0), TypeError, "proj_dim"),
        (lambda: project(torch.ones(2, 5), 4, kind="dense"), ValueError, "kind"),
        (lambda: project(torch.ones(2, 5), 4, feature_offset=-1), ValueError, "feature_offset"),
        (lambda: project(torch.ones(2, 5), 4, seed=-1), ValueError, "seed"),
        (lambda: project(torch.ones(2, 5), 4, seed=2**63), ValueError, "seed"),
        (lambda: project(torch.ones(2, 5), 4, seed=True), TypeError, "seed"),
        (lambda: project(torch.ones(2, 5), 4, precision="fp8"), ValueError, "precision"),
        (lambda: project(torch.ones(2, 5), 4, out=torch.zeros(2, 5)), ValueError, "out must have shape \\(2, 4\\)"),
        (lambda: project(torch.ones(2, 5), 4, out=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "out must have dtype"),
        (lambda: project(torch.ones(2, 5), 4, out=torch.zeros(2, 4, device="meta")), ValueError, "out is on meta"),
        (lambda: project("grads", 4), TypeError, "grads must be a tensor"),
        (lambda: project({"w": torch.ones(2, 3), "b": 1.0}, 4), TypeError, "grads\\['b'\\] must be a tensor"),
        (lambda: project({"w": torch.ones(2, 3), "b": torch.ones(3)}, 4), ValueError, "grads\\['b'\\] has batch size 3"),
        (lambda: project(torch.ones(2, 5).to_sparse(), 4), TypeError, "dense"),
        (lambda: project(torch.ones(2, 5), 4, out=torch.zeros(2, 4).to_sparse()), TypeError, "out must be a dense"),
        (lambda: project(torch.ones(2, 5), 4, kind=["rademacher"]), ValueError, "kind"),
        (lambda: project(torch.ones(2, 5), 4, precision=None), ValueError, "precision"),
        (lambda: project(torch.ones(2, 5), 4, scale="abc"), TypeError, "scale"),
        (lambda: project(torch.ones(2, 5), 4, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: project(torch.ones(2, 5), 4, scale=float("inf")), ValueError, "scale must be finite"),
        (lambda: project(torch.ones(2, 5), 4, feature_offset=2**62 - 2), ValueError, "feature_offset \\+ the number"),
        (lambda: projection_matrix(10, 4, dtype=torch.float16), TypeError, "dtype"),
        (lambda: projection_matrix(-1, 4), ValueError, "n must be"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_out_sharing_memory_with_grads_is_refused():
    """out is accumulated into while grads are read: aliasing would give garbage silently."""
    x = torch.randn(4, 300)
    with pytest.raises(RuntimeError, match="out must not share memory with grads\\[0\\]"):
        project(x, 300, out=x)
    buf = torch.randn(4, 600)
    with pytest.raises(RuntimeError, match="out must not share memory with grads\\[1\\]"):
        project([torch.randn(4, 10), buf[:, :300]], 300, out=buf[:, 300:])


def test_zero_width_pieces_contribute_nothing():
    a, b = torch.randn(3, 0), torch.randn(3, 50)
    assert torch.equal(project([a, b, torch.randn(3, 0, 7)], 20), project(b, 20))


@pytest.mark.parametrize("device,precision", [("cpu", 0)] + [
    ("cuda", p) for p in (0, 1, 2) if "cuda" in DEVICES])
def test_opcheck(device, precision):
    g = [torch.randn(3, 40, device=device), torch.randn(3, 2, 5, device=device)]
    if device == "cuda":
        g[1] = g[1].half()
    args = (g, 16, 5, 1, 3, 0.25, precision)
    torch.library.opcheck(torch.ops.trak_fast.project.default, args)
    torch.library.opcheck(torch.ops.trak_fast.project_add_.default,
                          (torch.randn(3, 16, device=device),) + args[:1] + args[2:])
    torch.library.opcheck(torch.ops.trak_fast.fill_projection_matrix_.default,
                          (torch.empty(7, 9, device=device), 1, 0, 2, 1.0))


def test_direct_op_call_checks_arguments():
    """Callers that bypass the Python wrapper still get an error, not a crash."""
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.trak_fast.project([torch.randn(2, 3)], 4, -1, 0, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="batch size"):
        torch.ops.trak_fast.project_add_(torch.zeros(3, 4), [torch.randn(2, 3)], 0, 0, 0, 1.0, 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [64, 700])
def test_thread_count_does_not_change_the_bits(kind, k):
    """Work is split by shape alone (256-column chunks, one thread and a serial GEMM each),
    so every output element is summed in the same order whatever the thread count."""
    g = torch.randn(5, 3000)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            outs.append(project(g, k, seed=4, kind=kind))
    finally:
        torch.set_num_threads(previous)
    assert rel_err(outs[0], reference(g, k, seed=4, kind=kind)) < 1e-5
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
