"""The matrix definition is a file format: pin it, check it against an independent
reimplementation, and check its statistical quality."""
import hashlib
import math

import numpy as np
import pytest
import torch

import trak_fast
from reference_matrix import entry, philox4x32_10

# Known-answer vectors of Philox4x32-10 published with Random123 (Salmon et al., 2011).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# (kind, seed, row, col, R[row, col] as a float32 hex string). Never edit these: features
# computed with trak_fast must be reproducible with every later version.
GOLDEN = [
    ("rademacher", 0, 0, 0, "-0x1.0p+0"),
    ("rademacher", 0, 5, 127, "0x1.0p+0"),
    ("rademacher", 1, 0, 0, "-0x1.0p+0"),
    ("rademacher", 2**62 + 3, 2**40 + 1, 1000, "0x1.0p+0"),
    ("rademacher", 7, 2**32, 3, "-0x1.0p+0"),
    ("gaussian", 0, 0, 0, "0x1.bfafe6p+0"),
    ("gaussian", 0, 5, 127, "0x1.02bbb2p+0"),
    ("gaussian", 1, 0, 0, "-0x1.9f5bbep-1"),
    ("gaussian", 2**62 + 3, 2**40 + 1, 1000, "0x1.7020e2p+0"),
    ("gaussian", 7, 2**32, 3, "-0x1.2061c2p+0"),
]
# sha256 of the float32 bytes of projection_matrix(64, 384, seed=42, feature_offset=2**33, scale=1).
GOLDEN_BLOCK = {
    "rademacher": "4b52654cfc9c9ddb3182a8420cc5be73cccd7fab1d1ed597087cb252e399ffb7",
    "gaussian": "f51c6352be790af8b673b3caf093bcfea26d127941f82f4878ab5296951329aa",
}


def unscaled(n, k, **kw):
    return trak_fast.projection_matrix(n, k, scale=1.0, **kw)


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_matches_published_vectors(counter, key, expected):
    assert philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("kind,seed,row,col,value", GOLDEN)
def test_golden_values(kind, seed, row, col, value):
    got = unscaled(1, col + 1, seed=seed, kind=kind, feature_offset=row)[0, col].item()
    assert got == float.fromhex(value)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_golden_block(kind):
    block = unscaled(64, 384, seed=42, kind=kind, feature_offset=2**33)
    assert hashlib.sha256(block.numpy().tobytes()).hexdigest() == GOLDEN_BLOCK[kind]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 2**40 + 7), (2**63 - 1, 2**48 - 3)])
def test_cpu_generator_bit_identical_to_reference(kind, seed, offset):
    n, k = 3, 261  # k crosses a 128-column Philox block and ends in a partial one
    got = unscaled(n, k, seed=seed, kind=kind, feature_offset=offset).numpy()
    ref = np.array([[entry(kind, seed, offset + i, j) for j in range(k)] for i in range(n)],
                   dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_do_not_depend_on_the_window(kind):
    """A pure function of (seed, i, j, kind): any sub-window is the same numbers."""
    full = unscaled(300, 700, seed=3, kind=kind)
    part = unscaled(100, 333, seed=3, kind=kind, feature_offset=150)
    assert torch.equal(full[150:250, :333], part)


def test_scaling():
    k = 300
    r = unscaled(50, k, seed=1)
    assert torch.equal(trak_fast.projection_matrix(50, k, seed=1), r * np.float32(1 / math.sqrt(k)))
    g64 = trak_fast.projection_matrix(50, k, seed=1, kind="gaussian", dtype=torch.float64)
    g32 = unscaled(50, k, seed=1, kind="gaussian").double()
    assert torch.equal(g64, g32 * (1 / math.sqrt(k)))


# ---- statistical quality ---------------------------------------------------------------

N_ROWS, N_COLS = 4096, 256  # about 10^6 entries


@pytest.fixture(scope="module", params=["rademacher", "gaussian"])
def sample(request):
    return request.param, unscaled(N_ROWS, N_COLS, seed=2024, kind=request.param).double()


def test_mean_and_variance(sample):
    kind, r = sample
    count = r.numel()
    # 6 standard errors: a false alarm about once in 10^9 runs.
    assert abs(r.mean().item()) < 6 / math.sqrt(count)
    if kind == "rademacher":
        assert set(r.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(r.var().item() - 1) < 6 * math.sqrt(2 / count)
        assert abs((r**4).mean().item() - 3) < 6 * math.sqrt(96 / count)  # kurtosis of N(0,1)


def test_gaussian_distribution_matches_normal_cdf():
    r = unscaled(N_ROWS, N_COLS, seed=99, kind="gaussian").double().flatten().sort().values
    count = r.numel()
    empirical = torch.arange(1, count + 1, dtype=torch.float64) / count
    ks = (torch.special.ndtr(r) - empirical).abs().max().item()
    assert ks < 1.95 / math.sqrt(count)  # Kolmogorov-Smirnov at the 0.1% level


def test_columns_pairwise_uncorrelated(sample):
    _, r = sample
    corr = torch.corrcoef(r.T)
    off_diagonal = corr[~torch.eye(N_COLS, dtype=torch.bool)]
    # Each entry is about N(0, 1/N_ROWS); the max of ~33k of them stays under 5.5 sigma.
    assert off_diagonal.abs().max().item() < 5.5 / math.sqrt(N_ROWS)
    assert abs(off_diagonal.mean().item()) < 6 / (math.sqrt(N_ROWS) * N_COLS)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_adjacent_seeds_uncorrelated(kind):
    for seed in (0, 1, 2**32 - 1, 2**32):
        a = unscaled(N_ROWS, N_COLS, seed=seed, kind=kind).double().flatten()
        b = unscaled(N_ROWS, N_COLS, seed=seed + 1, kind=kind).double().flatten()
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(a.numel())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_rows_far_apart_differ(kind):
    """Row indices are 64-bit: i and i + 2^32 (same low word) are unrelated rows."""
    a = unscaled(512, 256, seed=5, kind=kind, feature_offset=7)
    b = unscaled(512, 256, seed=5, kind=kind, feature_offset=7 + 2**32)
    agree = (a.sign() == b.sign()).double().mean().item()
    assert abs(agree - 0.5) < 6 * 0.5 / math.sqrt(a.numel())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_no_repeated_column_patterns(kind):
    r = unscaled(256, 1024, seed=11, kind=kind)
    signs = (r > 0).T.contiguous()
    assert len({bytes(row.numpy().tobytes()) for row in signs}) == 1024  # all columns distinct
    # Columns one Philox block apart (128) and one word apart (32) are unrelated.
    for shift in (4, 32, 128):
        agree = (signs[:-shift] == signs[shift:]).double().mean().item()
        assert abs(agree - 0.5) < 6 * 0.5 / math.sqrt(signs[shift:].numel())


def test_generic_cpu_generator_gives_the_same_bits():
    """The portable vectorized generator (what CPUs without AVX-512 run) matches too."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, trak_fast; "
        "b = trak_fast.projection_matrix(64, 384, seed=42, kind='gaussian', feature_offset=2**33, scale=1.0); "
        "print(hashlib.sha256(b.numpy().tobytes()).hexdigest())"
    )
    env = dict(os.environ, TRAK_FAST_DISABLE_AVX512="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == GOLDEN_BLOCK["gaussian"]
