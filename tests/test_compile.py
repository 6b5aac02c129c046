"""torch.compile(fullgraph=True) over code that calls trak_fast.project (CPU).

fullgraph=True turns any graph break into an error, so these tests pass only if dynamo traces
the Python wrapper and the ops' fake kernels give the right shapes and dtypes. Results are
compared with eager execution of the same function. (opcheck of the ops is in test_project.py.)
"""
import pytest
import torch
import torch._dynamo.testing

import trak_fast
from trak_fast.ops.projector import Projector


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def normalized_features(g: torch.Tensor) -> torch.Tensor:
    """A typical caller: project, then work on the features in the same graph."""
    feats = trak_fast.project(g, 64, seed=3, kind="gaussian")
    return feats / feats.norm(dim=1, keepdim=True)


def test_inductor_fullgraph_matches_eager():
    g = torch.randn(6, 300)
    compiled = torch.compile(normalized_features, fullgraph=True)
    assert torch.allclose(compiled(g), normalized_features(g), rtol=1e-5, atol=1e-6)


def sequence_features(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return trak_fast.project([a, b], 32, seed=1, scale=1.0) * 0.5


def dict_features_with_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], 32)
    trak_fast.project({"w": a}, 32, seed=1, out=out)
    return trak_fast.project({"b": b}, 32, seed=1, feature_offset=a[0].numel(), out=out)


@pytest.mark.parametrize("fn", [sequence_features, dict_features_with_out])
def test_sequence_dict_and_out_forms_trace_without_breaks(fn):
    a, b = torch.randn(4, 5, 6), torch.randn(4, 7)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    assert torch.allclose(compiled(a, b), fn(a, b), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_projector_object_inside_compiled_function():
    proj = Projector(48, seed=7)

    def features(g: torch.Tensor) -> torch.Tensor:
        return proj(g, model_id=2) + proj(g, seed_offset=1)

    g = torch.randn(3, 100)
    compiled = torch.compile(features, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(g), features(g), rtol=1e-5, atol=1e-6)


def test_dynamic_batch_size_compiles_once():
    """The fake kernel's output shape follows a symbolic batch size: no recompile per batch."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(normalized_features, backend=counter, fullgraph=True, dynamic=True)
    for batch in (3, 5, 9):
        g = torch.randn(batch, 300)
        out = compiled(g)
        assert out.shape == (batch, 64)
        assert torch.allclose(out, normalized_features(g), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def sparse_features_with_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = trak_fast.project({"w": a}, 32, seed=1, kind="sparse", nnz=3)
    return trak_fast.project([b], 32, seed=1, kind="sparse", nnz=3, feature_offset=a[0].numel(), out=out)


def test_sparse_kind_traces_without_breaks():
    a, b = torch.randn(4, 5, 6), torch.randn(4, 7)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(sparse_features_with_out, backend=counter, fullgraph=True)
    assert torch.allclose(compiled(a, b), sparse_features_with_out(a, b), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
