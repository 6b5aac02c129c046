"""optimizer_state=: per-example gradients divided by Adam's sqrt(v_hat) + eps, against float64
references computed here from the optimizer's own state dict."""
import copy

import numpy as np
import pytest
import torch

from trak_fast import Featurizer, attribute, featurize, model_seed, project, projection_matrix
from trak_fast.eval import digits

from test_gradients import N, _cases, _name_seed, _weight_matrix_grads

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = digits.load_digits(N, 4)
    return x, y


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _adam_state(model, steps=3, named=True, amsgrad=False, seed=0):
    """A real Adam state after a few steps on random gradients (so v differs per entry)."""
    torch.manual_seed(seed)
    params = list(model.named_parameters()) if named else list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, amsgrad=amsgrad)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (0.1 + torch.rand_like(p))
        opt.step()
    for p in model.parameters():
        p.grad = None
    return opt.state_dict()


def _inverse(model, state):
    """{name: 1 / (sqrt(v / (1 - beta2^t)) + eps)} in float64, by position (the reference)."""
    group = state["param_groups"][0]
    out = {}
    for index, (name, _) in enumerate(model.named_parameters()):
        entry = state["state"][index]
        v = entry["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].double()
        v_hat = v / (1 - group["betas"][1] ** float(entry["step"]))
        out[name] = 1 / (v_hat.sqrt() + group["eps"])
    return out


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
@pytest.mark.parametrize("gradients", ["auto", "vmap"])
def test_raw_and_dense_features_are_divided_exactly(data, name, gradients):
    model, batches, task, _ = _cases(data)[name]
    model = model.double()
    if name != "gpt2":
        batches = [(b[0].double(), b[1]) for b in batches]
    sd = model.state_dict()
    state = _adam_state(model)
    inverse = _inverse(model, state)
    raw = featurize(model, sd, batches, task=task, proj_dim=None, gradients=gradients)
    got = featurize(model, sd, batches, task=task, proj_dim=None, gradients=gradients,
                    optimizer_state=state).phi
    f = Featurizer(model, sd, task=task, proj_dim=None)
    expected = raw.phi.clone()
    for block in f.layout:
        expected[:, block.start:block.stop] *= inverse[block.name].reshape(1, -1)
    assert _rel(got, expected) < 1e-12
    assert _rel(raw.phi, expected) > 1e-2            # the division is not a no-op
    # A dense projection of the divided gradients: P^T (g / d), the same P as without.
    seed, model_id, k = 5, 1, 48
    dense = featurize(model, sd, batches, task=task, proj_dim=k, seed=seed, model_id=model_id,
                      gradients=gradients, optimizer_state=state).phi
    assert _rel(dense, project(expected, k, seed=model_seed(seed, model_id))) < 1e-10


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_factored_uses_the_rank_one_inverse_root(data, name):
    """With a rank-one second moment the factored form is exact: P_out^T (G / sqrt(V)) P_in
    for weights; biases and norm weights are divided exactly whatever V is."""
    model, batches, task, _ = _cases(data)[name]
    model = model.double()
    if name != "gpt2":
        batches = [(b[0].double(), b[1]) for b in batches]
    sd = model.state_dict()
    modules = dict(model.named_modules())
    torch.manual_seed(4)
    moments, as_matrix = {}, {}
    for pname, p in model.named_parameters():
        module = modules[pname.rsplit(".", 1)[0]]
        conv1d = type(module).__name__ == "Conv1D"
        if p.dim() >= 2:       # rank one as the [d_out, d_in] matrix of the factored form
            rows, cols = (p.shape[1], p.shape[0]) if conv1d else (p.shape[0], p[0].numel())
            v = torch.outer(0.5 + torch.rand(rows, dtype=torch.float64),
                            0.5 + torch.rand(cols, dtype=torch.float64))
            moments[pname] = (v.T if conv1d else v).reshape(p.shape)
            as_matrix[pname] = (lambda t: t.T) if conv1d else (lambda t, r=rows: t.reshape(r, -1))
        else:
            moments[pname] = 0.5 + torch.rand(p.shape, dtype=torch.float64)
    k_out, k_in, seed, model_id = 3, 4, 7, 1
    opts = dict(task=task, projection="factored", factored_dims=(k_out, k_in), seed=seed,
                model_id=model_id)
    f = Featurizer(model, sd, **opts)
    names = [b.name for b in f.layout]
    phi = featurize(model, sd, batches, optimizer_state=moments, **opts).phi
    raw = featurize(model, sd, batches, task=task, proj_dim=None, grad_wrt=names, gradients="vmap").phi
    grads = _weight_matrix_grads(raw, model, names)
    checkpoint_seed = model_seed(seed, model_id)
    eps = 1e-8                                          # a {name: v} mapping's default
    for block in f.layout:
        pname = block.name
        key = pname.rsplit(".", 1)[0] + ".weight"
        module = modules[pname.rsplit(".", 1)[0]]
        d_out, d_in = f.plan.dims[key]
        p_out = projection_matrix(d_out, k_out, seed=_name_seed(checkpoint_seed, key + "/out"),
                                  dtype=torch.float64)
        g, v = grads[pname], moments[pname]
        if pname.endswith("bias") or v.dim() == 1:      # exact: g / (sqrt(v) + eps), then P_out
            expected = (g / (v.sqrt() + eps)).reshape(g.shape[0], -1) @ p_out
        else:
            p_in = projection_matrix(d_in, k_in, seed=_name_seed(checkpoint_seed, key + "/in"),
                                     dtype=torch.float64)
            gm = torch.stack([as_matrix[pname](x) for x in g])           # [n, d_out, d_in]
            scaled = gm / (as_matrix[pname](v) + eps ** 2).sqrt()
            expected = (p_out.T @ scaled @ p_in).reshape(g.shape[0], -1)
        assert _rel(phi[:, block.start:block.stop], expected) < 1e-6, pname


def test_optimizer_state_matching_and_errors(data):
    x, y = data
    model = digits.make_mlp(16, seed=0)
    sd, batches = model.state_dict(), digits.batches(x, y, 12)
    by_name = _adam_state(model, named=True)
    by_position = _adam_state(model, named=False)
    assert "param_names" in by_name["param_groups"][0]
    a = featurize(model, sd, batches, proj_dim=32, optimizer_state=by_name).phi
    b = featurize(model, sd, batches, proj_dim=32, optimizer_state=by_position).phi
    assert torch.equal(a, b)                     # same random gradients, same seed: same state
    ams = _adam_state(model, amsgrad=True)
    assert "max_exp_avg_sq" in ams["state"][0]
    featurize(model, sd, batches, proj_dim=32, optimizer_state=ams)
    # Errors name the argument and what was expected.
    partial = torch.optim.Adam(list(model.parameters())[:2]).state_dict()
    with pytest.raises(ValueError, match="covers 2 parameters .* the model has"):
        featurize(model, sd, batches, optimizer_state=partial)
    with pytest.raises(ValueError, match="has not taken a step"):
        fresh = torch.optim.Adam(model.parameters())
        for p in model.parameters():
            fresh.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
        featurize(model, sd, batches, optimizer_state=fresh.state_dict())
    with pytest.raises(ValueError, match=r"no second moment for \['0.bias', '2.weight'"):
        featurize(model, sd, batches, optimizer_state={"0.weight": torch.ones(16, 64)})
    with pytest.raises(ValueError, match="second moment of '0.weight' has shape"):
        featurize(model, sd, batches, optimizer_state={n: torch.ones(3) for n, _ in model.named_parameters()})
    with pytest.raises(ValueError, match="negative or non-finite"):
        featurize(model, sd, batches, optimizer_state={n: -torch.ones_like(p) for n, p in model.named_parameters()})
    with pytest.raises(TypeError, match="optimizer_state .* must be a torch.optim state dict"):
        featurize(model, sd, batches, optimizer_state=[1, 2])
    with pytest.raises(ValueError, match="optimizer_states has 1 entries for 2 checkpoints"):
        attribute(model, [sd, sd], batches, batches[:1], optimizer_states=[by_name], progress=False)


@pytest.mark.parametrize("curvature", ["kernel", "fisher"])
def test_uniform_second_moment_leaves_scores_unchanged(data, curvature):
    """A constant v scales every feature by one number, to which the relative damping makes the
    scores invariant; a varying v changes them."""
    model, batches, task, _ = _cases(data)["gpt2"]
    sd = model.state_dict()
    kw = dict(task="language_modeling", progress=False, curvature=curvature, seed=3)
    text = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    plain = attribute(model, [sd], text, text[:1], **kw)
    uniform = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    scaled = attribute(model, [sd], text, text[:1], optimizer_states=[uniform], **kw)
    assert _rel(scaled, plain) < 1e-4
    varied = attribute(model, [sd], text, text[:1], optimizer_states=[_adam_state(model)], **kw)
    assert _rel(varied, plain) > 1e-2


def test_store_records_the_second_moments(data, tmp_path):
    """TRAK(...).featurize(optimizer_state=) gives attribute()'s scores; targets must come with
    the same state, and a store refuses to mix states for one model_id."""
    from trak_fast import TRAK
    x, y = data
    model = digits.make_mlp(16, seed=0)
    sd, train, targets = model.state_dict(), digits.batches(x, y, 12), digits.batches(x[:5], y[:5], 5)
    state = _adam_state(model)
    other = _adam_state(copy.deepcopy(model), seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    expected = attribute(model, [sd], train, targets, proj_dim=32, optimizer_states=[state],
                         progress=False)
    trak = TRAK(tmp_path, model, train_size=N, proj_dim=32, progress=False)
    trak.featurize(sd, train, model_id=0, optimizer_state=state)
    trak.finalize()
    with pytest.raises(ValueError, match="without an optimizer_state|with another optimizer_state"):
        trak.featurize_targets("t", sd, targets, model_id=0)
    with pytest.raises(ValueError, match="different checkpoint or optimizer_state"):
        trak.featurize(sd, train, model_id=0, optimizer_state=other)
    trak.featurize_targets("t", sd, targets, model_id=0, optimizer_state=state)
    got = torch.from_numpy(np.array(trak.score("t")))
    assert _rel(got, expected) < 1e-5
