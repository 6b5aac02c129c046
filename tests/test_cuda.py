"""The CUDA kernels against independent references (skipped without a GPU).

Cases that are the same test on either device live with the CPU tests, over ``conftest.DEVICES``
(test_project.py, test_projector.py, the compat tests); this file holds what only CUDA has:
the strategies, the precisions, streams, bit identity with the CPU generator.

The chain of trust: tests/test_matrix_definition.py checks the CPU generator against a numpy
reimplementation of the definition; here ``projection_matrix`` on CUDA is checked against the
CPU one (bit for bit), and ``project`` on CUDA against ``float64 g @ P`` with P materialized
by ``projection_matrix`` on CUDA, one block of rows at a time.

Error is ``||out - ref|| / ||ref||`` in float64. Each precision is held to two references:
  * the exact one (g and P as given): fp32 below 5e-5, tf32 below 1.5e-3, bf16 below 5e-3;
  * the one whose operands are rounded the way the precision promises (g to tf32 with
    round-to-nearest-ties-away, or to bf16 with round-to-nearest-even; Gaussian P too): every
    precision then lands within 1e-4 (float32 accumulation). That proves that the tensor-core
    paths round exactly what they say and accumulate in float32, and that the fast kernel (not
    the fp32 fallback, which ignores `precision`) ran.
Outputs are checked through ``out=`` pre-filled with random values (every element must move by
its reference value, so an element never written fails), and inside a NaN guard band (an
element written out of bounds fails).
"""
from __future__ import annotations

import math

import pytest
import torch

import trak_fast
from trak_fast.ops import library as _ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ops.has_cuda_kernels()),
    reason="needs a CUDA GPU and trak_fast built with its CUDA kernels",
)

PRECISIONS = ["fp32", "tf32", "bf16"]
# Bounds on the error against the exact float64 reference (rounding g to tf32 costs ~3e-4,
# to bf16 ~1.1e-3, relative).
EXACT_TOL = {"fp32": 5e-5, "tf32": 1.5e-3, "bf16": 5e-3}
# Bounds on the error against the reference with operands rounded as the precision promises:
# float32 accumulation. Tensor cores accumulate with truncation, which the fused kernel limits
# by flushing its accumulators every 512 MMAs (bias < 6.1e-5, project_fast.cu) and the GEMM
# strategy by cutting the feature sum into GEMMs of 16384 rows (1024 MMAs); 1e-4 still separates
# "rounded as promised" from "not rounded" (3e-4 for tf32, 1.1e-3 for bf16).
ROUNDED_TOL = {"fp32": 5e-5, "tf32": 1e-4, "bf16": 1e-4}
BIG_N = 2**20 + 3


# ---- references ------------------------------------------------------------------------------
def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> tf32 (10 mantissa bits), round to nearest, ties away from zero (cvt.rna)."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF  # on the magnitude bits; the sign bit is untouched
    return rounded.view(torch.float32)


def round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    x = x.float()
    if precision == "tf32":
        return round_tf32(x)
    if precision == "bf16":
        return x.bfloat16().float()
    return x


def reference(pieces, k, *, seed=0, kind="rademacher", feature_offset=0, scale=None,
              rounded_for=None) -> torch.Tensor:
    """float64 [B, k]: sum over pieces of flat(piece) @ R[rows, :] * scale, on the GPU.

    With ``rounded_for`` set to a precision, g (and Gaussian R) are first rounded to that
    precision's operand type, as the kernel promises to do.
    """
    if isinstance(pieces, torch.Tensor):
        pieces = [pieces]
    scale = 1.0 / math.sqrt(k) if scale is None else scale
    batch = pieces[0].shape[0]
    out = torch.zeros(batch, k, dtype=torch.float64, device="cuda")
    offset = feature_offset
    rows_per_block = max(1, 2**27 // (8 * k))
    for piece in pieces:
        g = piece.reshape(batch, -1)
        width = g.shape[1]
        for r0 in range(0, width, rows_per_block):
            rows = min(rows_per_block, width - r0)
            g_block = g[:, r0:r0 + rows]
            r = trak_fast.projection_matrix(rows, k, seed=seed, kind=kind,
                                            feature_offset=offset + r0, device="cuda", scale=1.0)
            if rounded_for is not None:
                g_block = round_operand(g_block, rounded_for)
                if kind == "gaussian":
                    r = round_operand(r, rounded_for)
            out += g_block.double() @ r.double()
        offset += width
    return out * scale


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output"
    num = torch.linalg.vector_norm(out.double() - ref)
    den = torch.linalg.vector_norm(ref)
    return float(num / den) if den > 0 else float(num)


def project_into_poison(pieces, k, **kwargs) -> torch.Tensor:
    """Runs project(out=buf) on a random-filled buffer inside a NaN guard band.

    Returns out - initial (float64). The guard rows (before and after, in the same
    allocation) must still be NaN, so an element written out of bounds shows up; an element
    never written keeps its initial value, so its delta is 0 (see assert_close_elementwise).
    """
    batch = (pieces if isinstance(pieces, torch.Tensor) else pieces[0]).shape[0]
    guard = 3
    buf = torch.full((batch + 2 * guard, k), float("nan"), device="cuda")
    out = buf[guard:guard + batch]
    out.copy_(torch.randn(batch, k, device="cuda"))
    initial = out.clone()
    result = trak_fast.project(pieces, k, out=out, **kwargs)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + batch:]).all(), \
        "an element outside the output was written"
    return out.double() - initial.double()


def assert_close_elementwise(delta: torch.Tensor, ref: torch.Tensor) -> None:
    """Every element within 2e-3 of the output's RMS (plus the rounding of out's initial
    values, |x| < 8): an element left unwritten (delta 0) fails unless its reference value is
    itself that small (~0.2% of elements), so a missed row, column or tile cannot pass."""
    rms = float(torch.sqrt((ref * ref).mean())) if ref.numel() else 0.0
    bad = (delta - ref).abs() > 2e-3 * rms + 2e-6
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off (first at " \
        f"{tuple(bad.nonzero()[0].tolist())})"


# ---- projection_matrix -----------------------------------------------------------------------
@pytest.mark.parametrize("n,k,offset", [
    (1, 1, 0), (257, 131, 5), (100, 4096, 2**32 - 50), (33, 1000, 2**62 - 34), (3000, 128, 2**40),
])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_rademacher_matrix_bit_identical_to_cpu(n, k, offset, scale):
    for seed in (0, 2**63 - 1):
        cpu = trak_fast.projection_matrix(n, k, seed=seed, feature_offset=offset, scale=scale)
        gpu = trak_fast.projection_matrix(n, k, seed=seed, feature_offset=offset, scale=scale,
                                          device="cuda")
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("n,k,offset", [(1, 3, 0), (257, 131, 5), (64, 2000, 2**32 - 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_matrix_bit_identical_to_cpu(n, k, offset, dtype):
    """The generator's float ops are all round-to-nearest (`*.rn` in the PTX, no .ftz or
    .approx), the same ops in the same order as the CPU's: the bits must agree."""
    cpu = trak_fast.projection_matrix(n, k, seed=11, kind="gaussian", feature_offset=offset,
                                      dtype=dtype)
    gpu = trak_fast.projection_matrix(n, k, seed=11, kind="gaussian", feature_offset=offset,
                                      dtype=dtype, device="cuda").cpu()
    assert torch.isfinite(gpu).all()
    assert torch.equal(gpu, cpu)


# ---- strategies (fused kernel, generate-then-GEMM) --------------------------------------------
STRATEGIES = ["fused", "gemm"]


@pytest.fixture
def strategy(request, monkeypatch):
    """Forces TRAK_FAST_CUDA_STRATEGY for the test (read by the C++ side at every call)."""
    monkeypatch.setenv("TRAK_FAST_CUDA_STRATEGY", request.param)
    return request.param


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("batch,k,n", [(1, 1, 1), (5, 300, 1023), (130, 4100, 700),
                                       (129, 260, 40000), (1, 64, BIG_N)])
def test_one_hot_rows_equal_scaled_matrix_rows_exactly(strategy, precision, kind, batch, k, n):
    """g[b] = e_{row(b)}: every product but one is 0 and the other is +-1 * R (exact in every
    operand type), every sum exact, so out[b] must be scale * R[row(b)] bit for bit, in every
    precision and strategy, whatever the tiling, splits, flushes or chunks (an element summed
    twice, missed or misplaced changes the bits)."""
    rows = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(batch + n))
    g = torch.zeros(batch, n, device="cuda")
    g[torch.arange(batch, device="cuda"), rows.cuda()] = 1.0
    scale = 0.37
    out = trak_fast.project(g, k, seed=7, kind=kind, scale=scale, precision=precision)
    r = trak_fast.projection_matrix(n, k, seed=7, kind=kind, scale=scale, device="cuda")
    expected = r[rows.cuda()]
    if kind == "gaussian" and precision != "fp32":
        # Gaussian entries are rounded to the operand type first; the product of a rounded
        # entry and the scale is then one float32 rounding, as for r.
        unscaled = trak_fast.projection_matrix(n, k, seed=7, kind=kind, scale=1.0, device="cuda")
        expected = round_operand(unscaled[rows.cuda()], precision) * scale
    assert torch.equal(out, expected)


@pytest.mark.parametrize("strategy", ["gemm"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n", [(130, 300, 40000), (256, 4100, 3000), (3, 129, 16385)])
def test_gemm_strategy_matches_float64_reference(strategy, dtype, batch, k, n):
    """Several row chunks (n > 16384), several column blocks (k > 4096), ragged edges."""
    torch.manual_seed(batch + k + n)
    g = torch.randn(batch, n, device="cuda").to(dtype)
    delta = project_into_poison(g, k, seed=3, precision="bf16")
    rounded = reference(g.float(), k, seed=3, rounded_for="bf16")
    assert rel_err(delta, rounded) < ROUNDED_TOL["bf16"]
    assert_close_elementwise(delta, rounded)
    assert rel_err(delta, reference(g.float(), k, seed=3)) < EXACT_TOL["bf16"]


@pytest.mark.parametrize("strategy", ["gemm"], indirect=True)
@pytest.mark.parametrize("layout", ["strided_features", "transposed", "row_slice"])
def test_gemm_strategy_non_contiguous_inputs(strategy, layout):
    g = _layouts()[layout]
    delta = project_into_poison(g, 300, seed=4, precision="bf16")
    rounded = reference(g.contiguous(), 300, seed=4, rounded_for="bf16")
    assert rel_err(delta, rounded) < ROUNDED_TOL["bf16"]
    assert_close_elementwise(delta, rounded)


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_strategies_deterministic(strategy):
    g = torch.randn(256, 40000, device="cuda")
    a = trak_fast.project(g, 1000, seed=1, precision="bf16")
    b = trak_fast.project(g, 1000, seed=1, precision="bf16")
    torch.cuda.synchronize()
    assert torch.equal(a, b)


def test_strategy_rule_is_shape_only(monkeypatch):
    """auto = gemm for bf16 at B >= 128 and k >= 256, fused otherwise (project_cuda.cu)."""
    def run(batch, k, forced):
        g = torch.randn(batch, 5000, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
        monkeypatch.setenv("TRAK_FAST_CUDA_STRATEGY", forced)
        return trak_fast.project(g, k, seed=2, precision="bf16")
    for batch, k, expected in [(128, 256, "gemm"), (127, 4096, "fused"), (1000, 255, "fused")]:
        auto = run(batch, k, "auto")
        other = "fused" if expected == "gemm" else "gemm"
        assert torch.equal(auto, run(batch, k, expected))
        assert not torch.equal(auto, run(batch, k, other))  # the two really differ in the bits


def test_strategy_variable_checked(monkeypatch):
    monkeypatch.setenv("TRAK_FAST_CUDA_STRATEGY", "cublas")
    with pytest.raises(RuntimeError, match="TRAK_FAST_CUDA_STRATEGY"):
        trak_fast.project(torch.randn(4, 100, device="cuda"), 64)


# ---- project: accuracy per precision, odd shapes --------------------------------------------
SMALL_SHAPES = [(b, k, n) for b in (1, 7, 1000) for k in (1, 100, 4096) for n in (1, 1023)]
# The long feature dimension: one-split and many-split launches, both tile configurations.
BIG_SHAPES = [(1, 4096, BIG_N), (7, 100, BIG_N), (1000, 1, BIG_N), (300, 1000, BIG_N)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch,k,n", SMALL_SHAPES + BIG_SHAPES)
def test_project_matches_float64_reference(batch, k, n, precision):
    torch.manual_seed(batch * 7919 + k * 31 + n)
    g = torch.randn(batch, n, device="cuda")
    delta = project_into_poison(g, k, seed=3, precision=precision)
    exact = reference(g, k, seed=3)
    rounded = reference(g, k, seed=3, rounded_for=precision)
    assert rel_err(delta, exact) < EXACT_TOL[precision]
    # Adding into out's initial values (|x| ~ 1) costs up to 6e-8 absolute per element, which
    # is up to ~1e-5 relative when n = 1 and k = 4096 (outputs ~ 1/64).
    assert rel_err(delta, rounded) < ROUNDED_TOL[precision]
    assert_close_elementwise(delta, rounded)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch,k,n", [(5, 300, 5000), (130, 260, 3000)])
def test_gaussian_project(batch, k, n, precision):
    g = torch.randn(batch, n, device="cuda")
    out = trak_fast.project(g, k, seed=9, kind="gaussian", precision=precision)
    assert rel_err(out, reference(g, k, seed=9, kind="gaussian")) < EXACT_TOL[precision] * 1.5
    rounded = reference(g, k, seed=9, kind="gaussian", rounded_for=precision)
    assert rel_err(out, rounded) < ROUNDED_TOL[precision]


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precisions_really_round(precision):
    """Error against the exact reference is well above fp32's: the operands were rounded."""
    g = torch.randn(64, 4096, device="cuda")
    out = trak_fast.project(g, 512, precision=precision)
    err = rel_err(out, reference(g, 512))
    assert err > (5e-5 if precision == "tf32" else 3e-4)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch,k,n", [(1000, 4096, 1023), (7, 100, BIG_N), (300, 1000, 70000)])
def test_deterministic(batch, k, n, precision):
    g = torch.randn(batch, n, device="cuda")
    a = trak_fast.project(g, k, seed=1, precision=precision)
    b = trak_fast.project(g, k, seed=1, precision=precision)
    torch.cuda.synchronize()
    assert torch.equal(a, b)


# ---- offsets past 2^32, sequences --------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sequence_whose_offsets_pass_2_32(precision):
    pieces = [torch.randn(9, 700, device="cuda"), torch.randn(9, 3, 5, 40, device="cuda"),
              torch.randn(9, 1, device="cuda"), torch.randn(9, 2049, device="cuda")]
    offset = 2**32 - 1000  # the second piece straddles 2^32
    delta = project_into_poison(pieces, 300, seed=5, feature_offset=offset, precision=precision)
    assert rel_err(delta, reference(pieces, 300, seed=5, feature_offset=offset)) < \
        EXACT_TOL[precision]
    rounded = reference(pieces, 300, seed=5, feature_offset=offset, rounded_for=precision)
    assert rel_err(delta, rounded) < ROUNDED_TOL[precision]
    assert_close_elementwise(delta, rounded)


def test_rows_2_32_apart_differ_on_cuda():
    """A kernel that truncated the feature index to 32 bits would give equal outputs."""
    g = torch.randn(4, 256, device="cuda")
    a = trak_fast.project(g, 128, feature_offset=5)
    b = trak_fast.project(g, 128, feature_offset=5 + 2**32)
    assert rel_err(b, reference(g, 128, feature_offset=5 + 2**32)) < EXACT_TOL["fp32"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_feature_offset_near_2_62(precision):
    g = torch.randn(3, 500, device="cuda")
    offset = 2**62 - 501  # the last usable rows
    out = trak_fast.project(g, 200, feature_offset=offset, precision=precision)
    assert rel_err(out, reference(g, 200, feature_offset=offset)) < EXACT_TOL[precision]


def test_out_accumulates_pieces_like_a_sequence():
    a, b = torch.randn(20, 3000, device="cuda"), torch.randn(20, 5, 7, device="cuda")
    out = torch.zeros(20, 256, device="cuda")
    trak_fast.project(a, 256, seed=2, out=out)
    trak_fast.project(b, 256, seed=2, feature_offset=3000, out=out)
    whole = trak_fast.project([a, b], 256, seed=2)
    assert torch.allclose(out, whole, rtol=1e-5, atol=1e-5)


# ---- input layouts and dtypes ------------------------------------------------------------------
def _layouts():
    base = torch.randn(40, 2 * 3001 + 1, device="cuda")
    return {
        "strided_features": base[:, ::2],                     # stride along features 2
        "misaligned_base": base[:, 1:3001],                   # base not 16-byte aligned
        "odd_row_stride": base[:, :3001],                     # row stride 6003, not a multiple of 4
        "transposed": torch.randn(2500, 40, device="cuda").t(),  # features on the slow axis
        "expanded_rows": torch.randn(1, 4096, device="cuda").expand(40, 4096),  # row stride 0
        "row_slice": base[3:37, 8:4104],                      # offset base, odd row stride: scalar loads
    }


LAYOUTS = ["strided_features", "misaligned_base", "odd_row_stride", "transposed",
           "expanded_rows", "row_slice"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout, precision):
    g = _layouts()[layout]
    delta = project_into_poison(g, 300, seed=4, precision=precision)
    rounded = reference(g.contiguous(), 300, seed=4, rounded_for=precision)
    assert rel_err(delta, rounded) < ROUNDED_TOL[precision]
    assert_close_elementwise(delta, rounded)
    # Bitwise the same function of the values as the contiguous copy whenever the split is the
    # same (it is: it depends on shapes only); only the load path differs.
    assert torch.equal(trak_fast.project(g, 300, seed=4, precision=precision),
                       trak_fast.project(g.contiguous(), 300, seed=4, precision=precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_strided_loader_large_tiles(precision):
    """B > 64 takes the 128-row tiles (Tf32Large, Bf16Large; B = 130 leaves a ragged row tile,
    k = 200 a ragged column tile and keeps bf16 on the fused kernel): strided g goes through the
    scalar loader (issue 25 rewrote its address arithmetic), the contiguous copy (row stride
    3000) through the 16-byte loads. Bitwise the same result."""
    g = torch.randn(130, 6000, device="cuda")[:, ::2]
    delta = project_into_poison(g, 200, seed=5, precision=precision)
    rounded = reference(g.contiguous(), 200, seed=5, rounded_for=precision)
    assert rel_err(delta, rounded) < ROUNDED_TOL[precision]
    assert torch.equal(trak_fast.project(g, 200, seed=5, precision=precision),
                       trak_fast.project(g.contiguous(), 200, seed=5, precision=precision))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (200, 4096) and (1, 4099) take the 16-byte load path (row stride a multiple of 8, or B == 1);
# the other two the scalar path.
@pytest.mark.parametrize("batch,n", [(5, 3001), (200, 4099), (200, 4096), (1, 4099)])
def test_half_inputs(dtype, precision, batch, n):
    g = torch.randn(batch, n, device="cuda").to(dtype)
    delta = project_into_poison(g, 600, seed=6, precision=precision)
    # The reference starts from the same 16-bit values, upcast exactly.
    rounded = reference(g.float(), 600, seed=6, rounded_for=precision)
    assert rel_err(delta, rounded) < ROUNDED_TOL[precision]
    assert_close_elementwise(delta, rounded)
    if precision != "bf16" or dtype == torch.bfloat16:
        assert rel_err(delta, reference(g.float(), 600, seed=6)) < ROUNDED_TOL[precision]


def test_float64_input_matches_float64_reference():
    g = torch.randn(6, 2000, device="cuda", dtype=torch.float64)
    out = trak_fast.project(g, 130, seed=8)
    assert out.dtype == torch.float64
    # The matrix entries are float32 numbers; float64 sums of them.
    assert rel_err(out, reference(g, 130, seed=8)) < 1e-12


def test_mixed_dtypes_in_one_sequence():
    pieces = [torch.randn(8, 500, device="cuda").half(), torch.randn(8, 300, device="cuda"),
              torch.randn(8, 70, device="cuda").bfloat16()]
    out = trak_fast.project(pieces, 257, seed=12)
    assert rel_err(out, reference([p.float() for p in pieces], 257, seed=12)) < EXACT_TOL["fp32"]


# ---- special values and empty inputs -----------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n", [100, 70000])
def test_nan_and_inf_propagate_to_their_rows_only(precision, n):
    g = torch.randn(70, n, device="cuda")
    g[3, n // 2] = float("nan")
    g[60, 7] = float("inf")
    out = trak_fast.project(g, 300, precision=precision)
    assert torch.isnan(out[3]).all()
    assert (~torch.isfinite(out[60])).all()
    others = [i for i in range(70) if i not in (3, 60)]
    assert torch.isfinite(out[others]).all()


def test_current_stream_is_used():
    g = torch.randn(100, 20000, device="cuda")
    expected = trak_fast.project(g, 1000, precision="bf16")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = trak_fast.project(g, 1000, precision="bf16")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


# ---- torch integration --------------------------------------------------------------------------
def test_torch_compile_fullgraph_cuda():
    def features(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = trak_fast.project([a, b], 512, seed=3, precision="bf16")
        return out / out.norm(dim=1, keepdim=True)

    a, b = torch.randn(16, 3000, device="cuda"), torch.randn(16, 4, 50, device="cuda")
    compiled = torch.compile(features, fullgraph=True)
    assert torch.allclose(compiled(a, b), features(a, b), rtol=1e-5, atol=1e-6)
