"""kind="sparse": the definition (pinned, against an independent reimplementation), its
statistics (the JL argument of trak_fast/projection.py), and project() against the float64
oracle with every input form, dtype and error of the dense kinds. CUDA tests at the end run
when a GPU is present."""
import hashlib
import math

import numpy as np
import pytest
import torch

import reference_sparse as rs
import trak_fast
from trak_fast.ops import library as _ops
from trak_fast import project, projection_matrix

# (seed, row, k, c, ((column, sign) of the first min(c, 4) nonzeros)). Never edit these:
# features computed with trak_fast must be reproducible with every later version.
GOLDEN = [
    (0, 0, 1024, 4, ((189, -1), (478, 1), (597, -1), (840, -1))),
    (0, 5, 1024, 4, ((152, -1), (374, -1), (587, 1), (826, -1))),
    (1, 0, 1000, 3, ((300, -1), (605, 1), (871, 1))),
    (2**62 + 3, 2**40 + 1, 4096, 16, ((7, -1), (437, -1), (703, 1), (788, 1))),
    (7, 2**32, 512, 64, ((4, 1), (9, 1), (21, 1), (27, -1))),
    (7, 2**32 - 1, 100, 1, ((1, 1),)),
]
# sha256 of the float32 bytes of projection_matrix(64, 384, kind="sparse", nnz=c, seed=42,
# feature_offset=2**33, scale=1).
GOLDEN_BLOCK = {
    1: "78b91b57325181ae55381ea9e8f1f77f759d32755560503c1ae00f453b5bcd2d",
    4: "f23cd681a3e52b67a28ea88e6cd5cafce0014cb6d6cd3895d1fee6e0d96a8680",
    16: "ee60b024de3d9f50a860bc2e3e4692a446f85c325ddddca2d4de1a9f5a1866d2",
}


def unscaled(n, k, c, **kw):
    return projection_matrix(n, k, kind="sparse", nnz=c, scale=1.0, **kw)


def reference(g, k, **kw):
    """float64 ground truth: g @ P with P materialized by the oracle."""
    g = g.reshape(g.shape[0], -1).double()
    return g @ projection_matrix(g.shape[1], k, kind="sparse", dtype=torch.float64, device=g.device, **kw)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the definition -------------------------------------------------------------------

@pytest.mark.parametrize("seed,row,k,c,nonzeros", GOLDEN)
def test_golden_values(seed, row, k, c, nonzeros):
    r = unscaled(1, k, c, seed=seed, feature_offset=row)[0]
    for l, (col, sign) in enumerate(nonzeros):
        assert rs.group(l, k, c)[0] <= col < sum(rs.group(l, k, c))
        assert r[col].item() == sign
    assert int((r != 0).sum()) == c


@pytest.mark.parametrize("c", sorted(GOLDEN_BLOCK))
def test_golden_block(c):
    block = unscaled(64, 384, c, seed=42, feature_offset=2**33)
    assert hashlib.sha256(block.numpy().tobytes()).hexdigest() == GOLDEN_BLOCK[c]


@pytest.mark.parametrize("n,k,c,seed,offset", [
    (50, 16, 4, 3, 0), (40, 17, 3, 5, 2**32 - 7), (30, 5, 5, 1, 0), (20, 64, 1, 9, 10**12),
    (12, 200, 64, 2**63 - 1, 2**62 - 13), (70, 1000, 7, 11, 123456789),
])
def test_matches_independent_reference(n, k, c, seed, offset):
    got = projection_matrix(n, k, kind="sparse", nnz=c, seed=seed, feature_offset=offset,
                            scale=1.0, dtype=torch.float64).numpy()
    assert np.array_equal(got, rs.matrix(n, k, c, seed, offset))


def test_scaling_and_dtypes():
    p32 = projection_matrix(100, 50, kind="sparse", nnz=4)
    p64 = projection_matrix(100, 50, kind="sparse", nnz=4, dtype=torch.float64)
    r = unscaled(100, 50, 4)
    assert torch.equal(p32, r * 0.5) and torch.equal(p64, r.double() * 0.5)
    p3 = projection_matrix(100, 50, kind="sparse", nnz=3, dtype=torch.float64)
    assert torch.equal(p3, unscaled(100, 50, 3).double() * (1 / math.sqrt(3)))


@pytest.mark.parametrize("k,c", [(64, 4), (100, 3), (7, 7), (1000, 16), (33, 1)])
def test_rows_have_c_nonzeros_one_per_group(k, c):
    r = unscaled(3000, k, c, seed=5)
    assert set(r.unique().tolist()) <= {-1.0, 0.0, 1.0}
    for l in range(c):
        start, m = rs.group(l, k, c)
        assert ((r[:, start:start + m] != 0).sum(1) == 1).all()
    # So every row of P = R / sqrt(c) has unit norm, exactly.
    assert torch.equal((r != 0).sum(1), torch.full((3000,), c))


@pytest.mark.parametrize("k,c", [(64, 4), (100, 3), (45, 2)])
def test_column_loads_are_exact(k, c):
    """A column of group l gets one nonzero from each block of m_l rows: over n rows that
    are whole blocks of every group, its load is n / m_l exactly (no column overloaded)."""
    sizes = [rs.group(l, k, c)[1] for l in range(c)]
    n = math.lcm(*sizes) * 2
    offset = math.lcm(*sizes) * 1000
    loads = (unscaled(n, k, c, seed=3, feature_offset=offset) != 0).sum(0)
    for l in range(c):
        start, m = rs.group(l, k, c)
        assert (loads[start:start + m] == n // m).all()


def test_permutation_positions_are_uniform():
    """Chi-square: over many blocks, the position p in a block lands in each column of its
    group equally often (a bad Feistel network or key schedule would skew this)."""
    k, c, blocks = 64, 4, 4000
    m = k // c
    r = unscaled(m * blocks, k, c, seed=17)
    for l in range(c):
        cols = (r[:, l * m:(l + 1) * m] != 0).int().argmax(1).reshape(blocks, m)
        table = torch.zeros(m, m)
        for p in range(m):
            table[p] = torch.bincount(cols[:, p], minlength=m).float()
        expected = blocks / m
        chi2 = ((table - expected) ** 2 / expected).sum().item()
        dof = (m - 1) ** 2
        assert chi2 < dof + 6 * math.sqrt(2 * dof)


def test_signs_are_balanced_and_independent_of_columns():
    r = unscaled(20000, 64, 4, seed=9)
    values = r[r != 0]
    assert abs(values.mean().item()) < 4 / math.sqrt(values.numel())
    # Sign of the first and the second nonzero of a row: uncorrelated.
    first, second = r[:, :16].sum(1), r[:, 16:32].sum(1)
    assert abs((first * second).mean().item()) < 4 / math.sqrt(20000)


# ---- the JL argument ---------------------------------------------------------------

def variance_formula(g, k, c):
    """Var ||P^T g||^2 = (2/c^2) sum_l sum_{i != i', different l-blocks} g_i^2 g_i'^2 / m_l
    (rows start at 0)."""
    g2 = g.double() ** 2
    total = 0.0
    for l in range(c):
        m = rs.group(l, k, c)[1]
        n_blocks = -(-g2.numel() // m)
        padded = torch.zeros(n_blocks * m, dtype=torch.float64)
        padded[: g2.numel()] = g2
        per_block = padded.reshape(n_blocks, m).sum(1)
        total += (per_block.sum() ** 2 - (per_block ** 2).sum()).item() / m
    return 2 * total / c**2


@pytest.mark.parametrize("k,c", [(64, 4), (60, 1), (96, 16)])
def test_norm_preserved_mean_and_variance(k, c):
    """E ||P^T g||^2 = ||g||^2 and the variance formula of the docstring, over 1500 seeds."""
    torch.manual_seed(0)
    g = torch.randn(300, dtype=torch.float64) * torch.linspace(0.2, 2, 300, dtype=torch.float64)
    x = torch.tensor([
        project(g[None], k, kind="sparse", nnz=c, seed=s).square().sum().item()
        for s in range(1500)
    ])
    norm2 = g.square().sum().item()
    var = variance_formula(g, k, c)
    assert var < 2.2 * norm2**2 / k  # the formula's bound ~ 2 ||g||^4 / k
    assert abs(x.mean().item() - norm2) < 4 * math.sqrt(var / 1500)
    assert abs(x.var().item() / var - 1) < 0.2


def test_vector_inside_one_block_is_projected_isometrically():
    """Rows of one block never collide in any group: ||P^T g|| = ||g|| for every seed."""
    g = torch.randn(3, 16, dtype=torch.float64)
    for seed in range(20):
        y = project(g, 64, kind="sparse", nnz=4, seed=seed, feature_offset=16 * 1000)
        assert torch.allclose(y.norm(dim=1), g.norm(dim=1), rtol=1e-12)


def agreement(a, b):
    """Fraction of nonzeros of a at the same place, and fraction of those with the same sign."""
    same_place = (a != 0) & (b != 0)
    return same_place.sum().item() / (a != 0).sum().item(), (a[same_place] == b[same_place]).float().mean().item()


@pytest.mark.parametrize("other", [
    dict(seed=1), dict(seed=2**32), dict(feature_offset=2**32), dict(feature_offset=2**32 * 16),
    dict(feature_offset=2**62 - 20001),
])
def test_independent_across_seeds_and_distant_rows(other):
    """Seeds 0 and s, and rows i and i + 2^32 (or + 2^36, or near 2^62), give unrelated
    matrices: columns coincide with probability 1/m and coinciding signs agree half the time."""
    k, c, n = 64, 4, 20000
    base = unscaled(n, k, c, seed=0, feature_offset=0)
    kw = dict(seed=0, feature_offset=0)
    kw.update(other)
    moved = unscaled(n, k, c, **kw)
    place, sign = agreement(base, moved)
    trials = n * c
    assert abs(place - 1 / 16) < 5 * math.sqrt((1 / 16) * (15 / 16) / trials)
    same = place * trials
    assert abs(sign - 0.5) < 5 * math.sqrt(0.25 / same)
    # And the projections themselves are uncorrelated.
    g = torch.randn(1, n, dtype=torch.float64)
    y0 = project(g, 4096, kind="sparse", nnz=4, seed=0)
    y1 = project(g, 4096, kind="sparse", nnz=4, **kw)
    corr = torch.corrcoef(torch.cat([y0, y1]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(4096)


# ---- project() ----------------------------------------------------------------------

@pytest.mark.parametrize("nnz", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("batch,n,k", [(1, 1, 64), (7, 1023, 100), (16, 5000, 300), (3, 2100, 2100)])
def test_matches_float64_reference(nnz, batch, n, k):
    g = torch.randn(batch, n)
    out = project(g, k, seed=7, kind="sparse", nnz=nnz)
    assert out.shape == (batch, k) and out.dtype == torch.float32
    assert rel_err(out, reference(g, k, seed=7, nnz=nnz)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-14)])
def test_input_dtypes(dtype, tol):
    g = torch.randn(5, 7777).to(dtype)
    out = project(g, 129, seed=3, kind="sparse", nnz=5)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out, reference(g, 129, seed=3, nnz=5)) < tol


def test_sequence_and_dict_forms_equal_concatenation():
    a, b, c = torch.randn(6, 10, 30), torch.randn(6, 1), torch.randn(6, 4, 5, 6).half()
    whole = torch.cat([a.reshape(6, -1), b, c.reshape(6, -1).float()], dim=1)
    expected = reference(whole, 200, seed=1, nnz=8)
    for grads in ([a, b, c], (a, b, c), {"w": a, "b": b, "conv": c}):
        assert rel_err(project(grads, 200, seed=1, kind="sparse", nnz=8), expected) < 1e-6


def test_feature_offset_composes_and_straddles_2_32():
    a, b = torch.randn(4, 6000), torch.randn(4, 9000)
    out = project(a, 150, seed=2, kind="sparse", feature_offset=2**32 - 6000)
    project(b, 150, seed=2, kind="sparse", feature_offset=2**32, out=out)
    whole = project([a, b], 150, seed=2, kind="sparse", feature_offset=2**32 - 6000)
    assert rel_err(out, whole) < 1e-6
    assert rel_err(whole, reference(torch.cat([a, b], 1), 150, seed=2, feature_offset=2**32 - 6000)) < 1e-6


def test_out_adds_strided_and_non_contiguous_inputs():
    g = torch.randn(4, 5000)
    base = torch.randn(4, 32)
    out = base.clone()
    assert project(g, 32, kind="sparse", out=out) is out
    assert torch.allclose(out, base + project(g, 32, kind="sparse"), atol=1e-5)
    strided = torch.zeros(32, 4).T
    project(g, 32, kind="sparse", out=strided)
    assert torch.equal(strided, project(g, 32, kind="sparse"))
    cm = torch.randn(9000, 8).T
    assert rel_err(project(cm, 70, kind="sparse"), reference(cm.contiguous(), 70)) < 1e-6
    sliced = torch.randn(8, 20000)[:, ::2]
    assert rel_err(project(sliced, 70, kind="sparse"), reference(sliced.contiguous(), 70)) < 1e-6


@pytest.mark.parametrize("batch,nnz", [(1, 4), (3, 16), (13, 5), (64, 1)])
def test_thread_count_does_not_change_the_bits(batch, nnz):
    """Each out element is summed by one unit in feature order, however units are cut."""
    g = torch.randn(batch, 20000)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 7, 1):
            torch.set_num_threads(threads)
            outs.append(project(g, 700, seed=4, kind="sparse", nnz=nnz))
    finally:
        torch.set_num_threads(previous)
    assert rel_err(outs[0], reference(g, 700, seed=4, nnz=nnz)) < 1e-6
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_seeds_nnz_and_kinds_differ_and_zero_width_pieces():
    g = torch.randn(2, 4000)
    outs = [project(g, 50, seed=s, kind="sparse", nnz=c) for s in (0, 1) for c in (2, 4)]
    outs.append(project(g, 50, kind="rademacher"))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j])
    a, b = torch.randn(3, 0), torch.randn(3, 50)
    assert torch.equal(project([a, b, torch.randn(3, 0, 7)], 20, kind="sparse"), project(b, 20, kind="sparse"))
    assert project(torch.randn(0, 10), 5, kind="sparse").shape == (0, 5)


def test_nan_reaches_exactly_the_rows_columns():
    g = torch.zeros(2, 300)
    g[1, 5] = float("nan")
    out = project(g, 16, kind="sparse", nnz=4)
    assert not torch.isnan(out[0]).any()
    cols = (projection_matrix(300, 16, kind="sparse", nnz=4)[5] != 0)
    assert torch.equal(torch.isnan(out[1]), cols)


def test_not_differentiable():
    g = torch.randn(2, 10, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        project(g, 4, kind="sparse").sum().backward()
    with pytest.raises(RuntimeError, match="not differentiable"):
        project(g, 4, kind="sparse", out=torch.zeros(2, 4)).sum().backward()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", nnz=0), ValueError, "nnz must be in \\[1, 65\\)"),
        (lambda: project(torch.ones(2, 5), 128, kind="sparse", nnz=65), ValueError, "nnz"),
        (lambda: project(torch.ones(2, 5), 3, kind="sparse", nnz=4), ValueError, "nnz must be at most proj_dim \\(3\\)"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", nnz=2.0), TypeError, "nnz must be an int"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", nnz=True), TypeError, "nnz"),
        (lambda: project(torch.ones(2, 5), 8, kind="rademacher", nnz=0), ValueError, "nnz"),
        (lambda: project(torch.randint(0, 3, (2, 5)), 8, kind="sparse"), TypeError, "float16, bfloat16"),
        (lambda: project([torch.ones(2, 5), torch.ones(3, 5)], 8, kind="sparse"), ValueError, "grads\\[1\\] has batch size 3"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", seed=-1), ValueError, "seed"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", feature_offset=-1), ValueError, "feature_offset"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", precision="fp8"), ValueError, "precision"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", out=torch.zeros(2, 5)), ValueError, "out must have shape"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", out=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "out must have dtype"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: project(torch.ones(2, 5), 8, kind="sparse", feature_offset=2**62 - 2), ValueError, "feature_offset \\+ the number"),
        (lambda: projection_matrix(10, 4, kind="sparse", nnz=5), ValueError, "nnz must be at most proj_dim"),
        (lambda: projection_matrix(10, 4, kind="sparse", nnz="4"), TypeError, "nnz"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_out_sharing_memory_with_grads_is_refused():
    x = torch.randn(4, 300)
    with pytest.raises(RuntimeError, match="out must not share memory with grads\\[0\\]"):
        project(x, 300, kind="sparse", out=x)


def test_direct_op_calls_check_arguments_and_opcheck():
    with pytest.raises(RuntimeError, match="nnz must be in"):
        torch.ops.trak_fast.project_sparse([torch.randn(2, 3)], 4, 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="nnz must be at most proj_dim"):
        torch.ops.trak_fast.project_sparse_add_(torch.zeros(2, 4), [torch.randn(2, 3)], 0, 5, 0, 1.0)
    with pytest.raises(RuntimeError, match="batch size"):
        torch.ops.trak_fast.project_sparse_add_(torch.zeros(3, 4), [torch.randn(2, 3)], 0, 2, 0, 1.0)
    with pytest.raises(RuntimeError, match="nnz"):
        torch.ops.trak_fast.fill_sparse_matrix_(torch.empty(3, 4), 0, 65, 0, 1.0)
    g = [torch.randn(3, 40), torch.randn(3, 2, 5)]
    # The schema and fake-kernel checks (the aot_dispatch ones take ~25 s on a loaded machine).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.trak_fast.project_sparse.default, (g, 16, 5, 3, 3, 0.25), test_utils=utils)
    torch.library.opcheck(torch.ops.trak_fast.project_sparse_add_.default, (torch.randn(3, 16), g, 5, 3, 3, 0.25),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.trak_fast.fill_sparse_matrix_.default, (torch.empty(7, 9), 1, 2, 2, 1.0),
                          test_utils=utils)


# ---- CUDA (runs when a GPU is present) ----------------------------------------------------

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ops.has_cuda_kernels()),
    reason="needs a CUDA GPU and trak_fast built with its CUDA kernels",
)


@cuda
@pytest.mark.parametrize("k,c", [(64, 4), (100, 3), (4096, 16), (7, 7), (1000, 64)])
def test_cuda_matrix_equals_cpu_bit_for_bit(k, c):
    for offset in (0, 2**32 - 1000):
        cpu = projection_matrix(3000, k, kind="sparse", nnz=c, seed=11, feature_offset=offset)
        gpu = projection_matrix(3000, k, kind="sparse", nnz=c, seed=11, feature_offset=offset, device="cuda")
        assert torch.equal(gpu.cpu(), cpu)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("batch,n,k,c", [(1, 1, 64, 4), (13, 70000, 1024, 4), (64, 300000, 512, 1), (9, 5000, 4100, 16)])
def test_cuda_project_matches_reference_and_is_deterministic(dtype, batch, n, k, c):
    g = torch.randn(batch, n, device="cuda").to(dtype)
    pre = torch.randn(batch, k, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = pre.clone()
    project(g, k, seed=5, kind="sparse", nnz=c, feature_offset=2**32 - 100, out=out)
    ref = reference(g, k, seed=5, nnz=c, feature_offset=2**32 - 100)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(out - pre, ref) < tol
    again = pre.clone()
    project(g, k, seed=5, kind="sparse", nnz=c, feature_offset=2**32 - 100, out=again)
    assert torch.equal(again, out)
    cpu = project(g.cpu(), k, seed=5, kind="sparse", nnz=c, feature_offset=2**32 - 100)
    assert rel_err(project(g, k, seed=5, kind="sparse", nnz=c, feature_offset=2**32 - 100).cpu(), cpu) < 1e-5


@cuda
def test_cuda_sequence_strided_and_out_forms():
    a, b = torch.randn(6, 10, 30, device="cuda"), torch.randn(900, 6, device="cuda").T
    whole = torch.cat([a.reshape(6, -1), b], dim=1)
    got = project({"a": a, "b": b}, 200, kind="sparse", nnz=8, seed=1)
    assert rel_err(got, reference(whole, 200, nnz=8, seed=1)) < 1e-5
    strided = torch.zeros(200, 6, device="cuda").T
    project([a, b], 200, kind="sparse", nnz=8, seed=1, out=strided)
    assert torch.equal(strided, got)


def test_projector_carries_nnz():
    proj = trak_fast.Projector(300, seed=2, kind="sparse", nnz=8)
    g = torch.randn(4, 5000)
    assert torch.equal(proj(g, model_id=3), project(g, 300, seed=trak_fast.model_seed(2, 3), kind="sparse", nnz=8))
    assert torch.equal(proj.matrix(100), projection_matrix(100, 300, seed=2, kind="sparse", nnz=8))
    assert proj.to_dict()["nnz"] == 8 and trak_fast.Projector(**proj.to_dict()) == proj
    assert proj != proj.replace(nnz=4)
    with pytest.raises(ValueError, match="nnz must be at most proj_dim"):
        trak_fast.Projector(4, kind="sparse", nnz=8)


def test_pipeline_passes_kind_and_nnz_through(tmp_path):
    """attribute / Featurizer use the sparse matrix with the given nnz; the TRAK store records
    nnz for sparse (and refuses a different one) while dense stores keep their settings."""
    from trak_fast.eval import digits
    from trak_fast.pipeline.attribute import attribute
    from trak_fast.features.featurizer import Featurizer
    from trak_fast.pipeline.store import StoreMismatchError
    from trak_fast.pipeline.trak import TRAK

    x, y, xt, yt = digits.load_digits(n_train=60, n_targets=10)
    model = digits.train(digits.make_mlp(16), x, y, epochs=2)
    ckpt = model.state_dict()
    feat = Featurizer(model, ckpt, proj_dim=64, kind="sparse", nnz=2, seed=3)
    dense = Featurizer(model, ckpt, proj_dim=None)
    batch = (x[:5], y[:5])
    phi = feat(batch)[0]
    raw = dense(batch)[0]
    expected = project(raw, 64, seed=trak_fast.model_seed(3, 0), kind="sparse", nnz=2)
    assert rel_err(phi, expected) < 1e-5
    scores = [attribute(model, [ckpt], digits.batches(x, y), digits.batches(xt, yt), proj_dim=64,
                        kind="sparse", nnz=c, progress=False) for c in (2, 8)]
    assert scores[0].shape == (60, 10) and not torch.allclose(scores[0], scores[1])
    trak = TRAK(tmp_path / "s", model, train_size=60, proj_dim=64, kind="sparse", nnz=2, progress=False)
    assert trak.store.settings["nnz"] == 2
    with pytest.raises(StoreMismatchError, match="nnz"):
        TRAK(tmp_path / "s", model, train_size=60, proj_dim=64, kind="sparse", nnz=4, progress=False)
    assert "nnz" not in TRAK(tmp_path / "d", model, train_size=60, proj_dim=64, progress=False).store.settings
    with pytest.raises(ValueError, match="nnz"):
        TRAK(tmp_path / "bad", model, train_size=60, proj_dim=8, kind="sparse", nnz=9, progress=False)
