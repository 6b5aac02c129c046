"""The kernel, the damping and the solve, against dense float64 linear algebra."""
import numpy as np
import pytest
import torch

from trak_fast.scoring.kernel import (RegularizedInverse, check_kernel, compute_kernel, gram_matrix, kernel_matrix,
                              resolve_lambda)


def _phi(n, k, seed=0, dtype=torch.float32):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_kernel_matches_dense_float64(block_rows):
    phi = _phi(203, 31)
    dense = phi.double().T @ phi.double()
    got = kernel_matrix(phi, block_rows=block_rows)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-10)


def test_kernel_of_memmap_equals_kernel_of_tensor(tmp_path):
    phi = _phi(50, 12)
    array = np.lib.format.open_memmap(tmp_path / "phi.npy", mode="w+", dtype="float16", shape=(50, 12))
    array[:] = phi.numpy()
    expected = torch.from_numpy(array.astype(np.float64))
    torch.testing.assert_close(kernel_matrix(np.load(tmp_path / "phi.npy", mmap_mode="r"), block_rows=16),
                               expected.T @ expected)


def test_gram_matrix_matches_dense():
    phi = _phi(37, 80)
    torch.testing.assert_close(gram_matrix(phi, block_rows=10), phi.double() @ phi.double().T)


def test_compute_kernel_picks_smaller_form():
    assert compute_kernel(_phi(40, 10)).form == "primal"
    dual = compute_kernel(_phi(10, 40))
    assert dual.form == "dual" and dual.matrix.shape == (10, 10)
    # tr(Phi Phi^T) = tr(Phi^T Phi): the relative damping is the same in both forms.
    phi = _phi(10, 40)
    assert compute_kernel(phi).trace == pytest.approx(compute_kernel(phi, form="primal").trace, rel=1e-12)


def test_regularized_inverse_cholesky_matches_dense_inverse():
    phi = _phi(60, 20, dtype=torch.float64)
    kernel = phi.T @ phi
    inverse = RegularizedInverse(kernel, 0.5)
    dense = torch.linalg.inv(kernel + 0.5 * torch.eye(20, dtype=torch.float64))
    assert inverse.method == "cholesky"
    torch.testing.assert_close(inverse.matrix(), dense, rtol=1e-10, atol=1e-12)
    rhs = _phi(20, 3, seed=1, dtype=torch.float64)
    torch.testing.assert_close(inverse.solve(rhs), dense @ rhs, rtol=1e-10, atol=1e-12)


def test_singular_kernel_without_damping_gives_pseudo_inverse():
    # k > n: K = Phi^T Phi has rank n < k; trak 0.3.2 with lambda = 0 fails here.
    phi = _phi(5, 12, dtype=torch.float64)
    kernel = phi.T @ phi
    inverse = RegularizedInverse(kernel, 0.0)
    assert inverse.method == "eigh"
    torch.testing.assert_close(inverse.matrix(), torch.linalg.pinv(kernel, hermitian=True),
                               rtol=1e-8, atol=1e-8)
    assert torch.isfinite(inverse.solve(torch.ones(12, 2, dtype=torch.float64))).all()


def test_zero_kernel_never_fails():
    inverse = RegularizedInverse(torch.zeros(4, 4, dtype=torch.float64), 0.0)
    assert torch.equal(inverse.matrix(), torch.zeros(4, 4, dtype=torch.float64))


def test_relative_lambda_is_mean_squared_feature_norm():
    phi = _phi(30, 8, dtype=torch.float64)
    kernel = compute_kernel(phi)
    expected = 0.3 * (phi ** 2).sum(dim=1).mean().item()
    assert resolve_lambda(kernel.trace, 30, 0.3, relative=True) == pytest.approx(expected, rel=1e-12)
    assert resolve_lambda(kernel.trace, 30, 0.3, relative=False) == 0.3
    # Scale-free: rescaling the features rescales lambda like the kernel.
    scaled = compute_kernel(7.0 * phi)
    assert resolve_lambda(scaled.trace, 30, 0.3, True) == pytest.approx(49.0 * expected, rel=1e-12)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True])
def test_bad_lambda_raises(bad):
    with pytest.raises(ValueError, match="lambda_reg"):
        resolve_lambda(1.0, 10, bad, relative=True)


def test_check_kernel_refuses_zero_and_non_finite_features():
    phi = _phi(20, 6)
    kernel = compute_kernel(phi)
    assert check_kernel(kernel) is kernel
    zero = compute_kernel(torch.zeros(20, 6))
    with pytest.raises(ValueError, match="model_id 3: every train feature is zero"):
        check_kernel(zero, "model_id 3")
    # One zero row (an example with no gradient) is legitimate.
    check_kernel(compute_kernel(torch.cat([phi[:19], torch.zeros(1, 6)])))
    with pytest.raises(ValueError, match="NaN or inf"):
        check_kernel(compute_kernel(torch.cat([phi[:19], torch.full((1, 6), float("nan"))])))
