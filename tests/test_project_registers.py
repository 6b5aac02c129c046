"""The CPU register kernel for float32 Rademacher projections (csrc/cpu/project_registers_cpu.cpp).

It is checked against the float64 oracle (projection_matrix in float64, then a matmul), for
bitwise independence of the thread count and of the batch blocking, and for the same bits
from its AVX-512, AVX2 + FMA and portable variants. TRAK_FAST_CPU_KERNEL=registers / tiles
forces either CPU path (read at every call), so both are tested on the same shapes.
"""
import os
import subprocess
import sys

import pytest
import torch

from trak_fast import project, projection_matrix

PATHS = ["registers", "tiles"]


def reference(grads, k, **kw):
    """float64 ground truth for a tensor, sequence or dict of [B, ...] pieces."""
    pieces = list(grads.values()) if isinstance(grads, dict) else [grads] if torch.is_tensor(grads) else grads
    g = torch.cat([p.reshape(p.shape[0], -1).double() for p in pieces], dim=1)
    return g @ projection_matrix(g.shape[1], k, dtype=torch.float64, **kw)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def kernel(monkeypatch):
    def use(path):
        monkeypatch.setenv("TRAK_FAST_CPU_KERNEL", path)
    return use


# Ragged shapes: every B from 1 to 9 (the register blocks hold 8, 4 or 1 rows), k below,
# at and above the 256-column chunk and not a multiple of 16, n below and above the
# 256-row block and odd.
RAGGED = [(1, 1, 1), (2, 3, 17), (3, 255, 256), (4, 257, 257), (5, 513, 300), (6, 1, 700),
          (7, 1025, 31), (8, 600, 513), (9, 777, 1000)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch,n,k", RAGGED)
def test_matches_float64_reference(kernel, path, batch, n, k):
    kernel(path)
    g = torch.randn(batch, n)
    for offset in (0, 2**32 - 100, 2**48 + 5):  # rows straddling 2^32, and far out
        out = project(g, k, seed=11, feature_offset=offset)
        assert out.shape == (batch, k) and out.dtype == torch.float32
        assert rel_err(out, reference(g, k, seed=11, feature_offset=offset)) < 1e-5


def test_the_switch_selects_different_summation_orders(kernel):
    """Guards the tests above: the two paths really are different code (not bitwise equal)."""
    g = torch.randn(3, 3000)
    kernel("registers")
    a = project(g, 300)
    kernel("tiles")
    b = project(g, 300)
    assert rel_err(a, b) < 1e-5 and not torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_pieces_of_mixed_dtypes_and_strides(kernel, path):
    kernel(path)
    b = 5
    grads = {
        "w": torch.randn(b, 20, 30).to(torch.bfloat16),
        "bias": torch.randn(b, 7).to(torch.float16),
        "t": torch.randn(b, 40, 9).transpose(1, 2),      # non-contiguous float32
        "s": torch.randn(b, 1200)[:, ::3],               # stride 3 along the features
        "z": torch.randn(b, 0),
        "last": torch.randn(b, 333),
    }
    expected = reference(grads, 450, seed=3, feature_offset=2**33)
    assert rel_err(project(grads, 450, seed=3, feature_offset=2**33), expected) < 1e-5
    assert rel_err(project(list(grads.values()), 450, seed=3, feature_offset=2**33), expected) < 1e-5


def test_out_adds_exactly(kernel):
    """The register path adds its result into out as a last step: out + project(g) exactly."""
    kernel("registers")
    g = torch.randn(6, 900)
    base = torch.randn(6, 300)
    out = base.clone()
    assert project(g, 300, out=out) is out
    assert torch.equal(out, base + project(g, 300))
    strided = torch.zeros(300, 6).T
    project(g, 300, out=strided)
    assert torch.equal(strided, project(g, 300))


def test_rows_do_not_depend_on_the_rest_of_the_batch(kernel):
    """Batch rows are blocked 8, 4 or 1 at a time; each row's sum is the same either way."""
    kernel("registers")
    g = torch.randn(11, 1500)
    whole = project(g, 520, seed=2)
    for b in range(11):
        assert torch.equal(whole[b : b + 1], project(g[b : b + 1], 520, seed=2))


@pytest.mark.parametrize("batch", [1, 5, 9])
@pytest.mark.parametrize("k", [100, 700, 2048])
def test_thread_count_does_not_change_the_bits(kernel, batch, k):
    kernel("registers")
    g = torch.randn(batch, 2000)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            outs.append(project(g, k, seed=4))
    finally:
        torch.set_num_threads(previous)
    assert rel_err(outs[0], reference(g, k, seed=4)) < 1e-5
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


_VARIANT_CHILD = r"""
import os, sys, torch
torch.set_num_threads(2)
os.environ["TRAK_FAST_CPU_KERNEL"] = "registers"
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import test_project_registers as t
torch.save(t.variant_outputs(), sys.argv[2])
"""


def variant_outputs():
    """A fixed set of register-kernel results over ragged shapes, dtypes and offsets."""
    gen = torch.Generator().manual_seed(123)
    outs = []
    # k = 32, 80, 130, 176: 2, 5, 9 and 11 groups of 16 columns, the AVX2 kernel's tail passes
    for batch, n, k in RAGGED + [(13, 4100, 2048), (5, 300, 32), (4, 300, 80), (2, 300, 130), (1, 300, 176)]:
        g = torch.randn(batch, n, generator=gen)
        outs.append(project(g, k, seed=5, feature_offset=2**32 - 7))
    mixed = {"a": torch.randn(3, 300, generator=gen).half(), "b": torch.randn(3, 10, 50, generator=gen).bfloat16(),
             "c": torch.randn(3, 999, generator=gen)[:, ::2]}
    outs.append(project(mixed, 777, seed=9, feature_offset=2**40))
    base = torch.randn(4, 300, generator=gen)
    outs.append(project(torch.randn(4, 513, generator=gen), 300, out=base))
    return outs


@pytest.mark.parametrize("disable", [["TRAK_FAST_DISABLE_AVX512"], ["TRAK_FAST_DISABLE_AVX512", "TRAK_FAST_DISABLE_AVX2"]],
                         ids=["avx2", "portable"])
def test_instruction_set_variants_give_the_same_bits(kernel, tmp_path, disable):
    """What runs in this process (AVX-512 where the CPU has it) against the AVX2 + FMA kernel
    and the portable loops, each selected in a fresh process (the choice is made once)."""
    kernel("registers")
    here = os.path.abspath(__file__)
    env = dict(os.environ, **{name: "1" for name in disable})
    target = tmp_path / "outs.pt"
    subprocess.run([sys.executable, "-c", _VARIANT_CHILD, here, str(target)], env=env, check=True)
    theirs = torch.load(target)
    ours = variant_outputs()
    assert len(theirs) == len(ours)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_default_takes_the_register_kernel_at_every_batch_size(kernel):
    """Every float32 Rademacher call takes the register kernel by default (docs/matrix.md, the CPU
    kernels); TRAK_FAST_CPU_KERNEL=tiles stays an override for benchmarks."""
    for batch in (1, 256, 257, 600):
        g = torch.randn(batch, 300)
        kernel("auto")
        chosen = project(g, 260)
        kernel("registers")
        assert torch.equal(chosen, project(g, 260))
        kernel("tiles")
        assert not torch.equal(chosen, project(g, 260))


_DEFAULT_CHILD = r"""
import os, sys, torch
os.environ.pop("TRAK_FAST_CPU_KERNEL", None)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import test_project_registers as t
torch.save(t.default_outputs(), sys.argv[2])
"""

DEFAULT_BATCHES = (1, 5, 300, 600)


def default_outputs():
    """Under default settings, for each B in DEFAULT_BATCHES: project(G) with 2 threads, and
    whether it equals the 1-thread result and, row by row, project(G[b:b+1]) bitwise."""
    gen = torch.Generator().manual_seed(321)
    previous = torch.get_num_threads()
    outs, same_threads, same_rows = [], [], []
    try:
        for batch in DEFAULT_BATCHES:
            g = torch.randn(batch, 300, generator=gen)  # 300 rows: a block of 256 and one of 44
            torch.set_num_threads(2)
            whole = project(g, 300, seed=8)  # 300 columns: 16 groups, then 3 in a second chunk
            same_rows.append(all(torch.equal(whole[b : b + 1], project(g[b : b + 1], 300, seed=8))
                                 for b in range(batch)))
            torch.set_num_threads(1)
            same_threads.append(torch.equal(project(g, 300, seed=8), whole))
            outs.append(whole)
    finally:
        torch.set_num_threads(previous)
    return {"outs": outs, "same_threads": same_threads, "same_rows": same_rows}


def test_default_bits_do_not_depend_on_batch_size_threads_or_instruction_set(monkeypatch, tmp_path):
    """Issue 25: a float32 Rademacher call gives the same bits whatever the batch it sits in,
    the thread count and the instruction set. Row b of project(G) is project(G[b:b+1]) bitwise
    for B on both sides of the old 256 threshold, 1 and 2 threads agree, and the AVX2 + FMA and
    portable kernels (fresh processes) give what runs here; all near the float64 reference."""
    monkeypatch.delenv("TRAK_FAST_CPU_KERNEL", raising=False)
    ours = default_outputs()
    assert all(ours["same_rows"]) and all(ours["same_threads"])
    gen = torch.Generator().manual_seed(321)
    for batch, out in zip(DEFAULT_BATCHES, ours["outs"]):
        g = torch.randn(batch, 300, generator=gen)
        assert rel_err(out, reference(g, 300, seed=8)) < 1e-5
    here = os.path.abspath(__file__)
    for disable in (["TRAK_FAST_DISABLE_AVX512"], ["TRAK_FAST_DISABLE_AVX512", "TRAK_FAST_DISABLE_AVX2"]):
        target = tmp_path / "default.pt"
        env = dict(os.environ, **{name: "1" for name in disable})
        subprocess.run([sys.executable, "-c", _DEFAULT_CHILD, here, str(target)], env=env, check=True)
        theirs = torch.load(target)
        assert all(theirs["same_rows"]) and all(theirs["same_threads"]), disable
        for a, b in zip(ours["outs"], theirs["outs"]):
            assert torch.equal(a, b), disable


def test_gaussian_and_float64_always_take_the_tiles(kernel):
    g = torch.randn(4, 1000)
    for kind, x in (("gaussian", g), ("rademacher", g.double())):
        kernel("registers")
        a = project(x, 300, kind=kind)
        kernel("tiles")
        assert torch.equal(a, project(x, 300, kind=kind))


def test_nan_inf_and_empty(kernel):
    kernel("registers")
    g = torch.randn(3, 700)
    g[1, 5] = float("nan")
    g[2, 400] = float("inf")
    out = project(g, 300)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all() and torch.isinf(out[2]).all()
    assert project(torch.randn(0, 10), 5).shape == (0, 5)


def test_unknown_kernel_name_is_refused(kernel):
    kernel("fast")
    with pytest.raises(RuntimeError, match="TRAK_FAST_CPU_KERNEL must be 'auto', 'registers' or 'tiles', got 'fast'"):
        project(torch.randn(2, 10), 4)
