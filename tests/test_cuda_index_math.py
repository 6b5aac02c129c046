"""The fused CUDA kernel's index arithmetic, checked on the CPU (no GPU needed).

csrc/cuda/project_fast_index.h holds the tile, split, load and flush index functions that
csrc/cuda/project_fast.cu calls; tests/cuda_index_math.cpp compiles them as plain C++ and replays
every thread of every block for one shape, over all 5 tile configurations and both load widths
(scalar, 16-byte) for 4- and 2-byte inputs. It proves, per shape: every output element (and
partial-sum slot) written exactly once per flush and nothing outside [B, k]; every gradient
element read exactly once per column tile and nothing outside g or its block's split; every
16-byte vector aligned; every shared-memory slot of the g slice and the staging buffer filled
exactly once; each entry of the Rademacher slice of R given the bit pattern of the definition's
value. The shapes are ragged on purpose: B = 1, B one past a tile (65, 129), k one past a
Philox block (4099), widths with a partial last step and several feature splits.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cuda_index_math.cpp")
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no C++ compiler on PATH")
    exe = str(tmp_path_factory.mktemp("index_math") / "cuda_index_math")
    subprocess.run([COMPILER, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc", "cuda"),
                    "-I", os.path.join(ROOT, "csrc", "include"), SOURCE, "-o", exe],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("batch,k,width", [
    (1, 1, 1),            # everything partial
    (1, 4099, 4099),      # k one past a Philox block; one row takes the 16-byte path anyway
    (7, 100, 1023),       # partial last step
    (65, 1000, 5000),     # one row past a small tile
    (129, 300, 9001),     # one row past a large tile, several splits
    (130, 260, 3000),
    (1, 1, 70001),        # 18 feature splits of a long row
    (300, 513, 2049),     # k one past the 512-column tile
])
def test_index_math_covers_every_element_once(walker, batch, k, width):
    res = subprocess.run([walker, str(batch), str(k), str(width)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok 20"), res.stdout  # 5 configs x 2 input sizes x 2 widths


@pytest.mark.parametrize("fault,shape,expect", [
    (1, ("127", "300", "3000"), "outside"),       # B = 2 * 64 - 1: the wrong predicate reads row 127
    (2, ("130", "301", "3000"), "output slot"),   # a column written twice, another never
    (3, ("7", "100", "1000"), "the definition says"),  # signs from the wrong Philox word
])
def test_index_math_walker_rejects_a_broken_kernel(walker, tmp_path, fault, shape, expect):
    """The walker is not vacuous: replaying a kernel with an off-by-one in the full-slice
    predicate (1), in the flush's lane mapping (2) or signs from the wrong Philox word (3), it
    fails with the matching message."""
    exe = str(tmp_path / f"faulty{fault}")
    subprocess.run([COMPILER, "-std=c++17", "-O2", f"-DINJECT_FAULT={fault}",
                    "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", os.path.join(ROOT, "csrc", "include"),
                    SOURCE, "-o", exe], check=True, capture_output=True, text=True)
    res = subprocess.run([exe, *shape], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and expect in res.stdout, res.stdout
